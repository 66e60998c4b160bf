"""The real artefacts in ../shared/real (tokenizers with their chat templates, a tiny checkpoint),
read in place at test time; a test that needs one skips with the reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL = Path(os.environ.get("PACKTUNE_REAL_DIR", Path(__file__).resolve().parents[3] / "shared" / "real"))


def real_path(*parts: str) -> Path:
    path = REAL.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared real artefacts; set PACKTUNE_REAL_DIR)")
    return path
