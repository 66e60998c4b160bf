"""The tokenize-once cache: memory-mapped numpy arrays in a folder named by a hash of the inputs.

The key covers the bytes of every data source (and its format, field map and weight), the
tokenizer files, the template definition and every option that changes the result, so editing any
of them gives a new folder, and an unchanged input loads in milliseconds (the arrays are mapped,
not read). A folder is written under a temporary name and renamed into place, so an interrupted
run never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """`$PACKTUNE_CACHE`, else `~/.cache/packtune/data`."""
    env = os.environ.get("PACKTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "packtune" / "data"


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def path_digest(path: str | Path) -> str:
    """`file_digest` of a file; of a folder (a `save_to_disk` dataset), a digest of its files'
    names and digests."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path)
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of the JSON-serialisable `parts` (plus the cache format version)."""
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def load(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays (memory-mapped, read-only) and metadata of a complete cache folder, or None."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return arrays, meta


def save(folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write `arrays` and `meta` as `folder`, atomically; a concurrent writer's copy wins if first."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        (tmp / "meta.json").write_text(json.dumps({**meta, "arrays": sorted(arrays)}, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
