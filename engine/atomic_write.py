"""Whole-file writes that a kill cannot cut short: readers see the old file or the whole new one.

The text goes to a temporary file beside the target (the same filesystem, so the rename is atomic),
is flushed to the device (fsync: a power loss after the rename cannot leave an empty file), then
renamed over the target; on any failure the temporary file is removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` (its folder created if missing) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
