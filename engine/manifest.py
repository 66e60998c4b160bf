"""A checkpoint's manifest: every file's size and CRC-32, written last, so damage is found, not loaded.

`manifest.json` in a checkpoint directory lists each file the save wrote (every rank's DCP shards,
`.metadata`, every rank's `extra_rank<r>.pt`) with its size in bytes and the CRC-32 of its
contents. The save computes it from the files as they lie on disk after they were written and
synced (each rank hashes the files it wrote; rank 0 gathers the entries) and writes it atomically
as the checkpoint's last file, before the directory gets its final name.

`verify` compares a checkpoint against its manifest: a missing, extra, shorter or longer file, or
different contents. A checkpoint of a packtune that wrote no manifest is checked against DCP's own
`.metadata` instead (every byte range it names must exist), which finds a truncated file but not
changed bytes.

CRC-32 (zlib, in the standard library: no dependency) rather than a cryptographic hash: it detects
accidental damage, not tampering, and it is the fastest of the standard library's checksums.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "packtune-checkpoint-manifest"
_CHUNK = 4 << 20


def crc32_file(path: Path) -> int:
    """CRC-32 of a file's contents, read in 4 MiB chunks."""
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


def file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "crc32": f"{crc32_file(path):08x}"}


def rank_files(names: list[str], rank: int) -> list[str]:
    """The files of a checkpoint directory that `rank` wrote: its DCP shards `__<rank>_<n>.distcp`
    and `extra_rank<rank>.pt`; rank 0 also DCP's `.metadata`."""
    own = [n for n in names
           if (n.startswith(f"__{rank}_") and n.endswith(".distcp")) or n == f"extra_rank{rank}.pt"]
    return own + ([".metadata"] if rank == 0 and ".metadata" in names else [])


def write_manifest(directory: Path, step: int, world_size: int, files: dict[str, dict[str, Any]]) -> None:
    """Write `manifest.json` atomically (temp file, fsync, rename, fsync of the directory)."""
    body = {"format": FORMAT, "version": 1, "step": step, "world_size": world_size, "checksum": "crc32",
            "files": dict(sorted(files.items()))}
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict[str, Any] | str:
    """The manifest's file table, or why it cannot be used."""
    try:
        body = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{MANIFEST} does not read ({e})"
    if not isinstance(body, dict):
        return f"{MANIFEST} is not a packtune checkpoint manifest"
    files = body.get("files")
    well_formed = isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("crc32"), str)
        for e in files.values())
    if body.get("format") != FORMAT or not well_formed:
        return f"{MANIFEST} is not a packtune checkpoint manifest"
    return files


def verify(directory: Path, part: tuple[int, int] | None = (0, 1)) -> str | None:
    """None when `directory` matches its manifest, else the first problem found (one line).

    Every file's presence and size is checked; the contents (CRC-32) of the files whose index in
    the sorted list is `part[0]` modulo `part[1]` (ranks share the reading), of none for `part=None`."""
    try:
        return _verify(directory, part)
    except OSError as e:
        return f"cannot be read ({e.strerror or e}: {e.filename or directory})"


def _verify(directory: Path, part: tuple[int, int] | None) -> str | None:
    files = read_manifest(directory)
    if isinstance(files, str):
        if (directory / ".metadata").is_file():
            return verify_legacy(directory)
        return files
    present = {p.name for p in directory.iterdir() if p.name != MANIFEST}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    if missing:
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    if extra:
        return f"{extra[0]} is not in the manifest (a file added after the save)"
    index, count = part or (0, 0)
    for i, (name, entry) in enumerate(sorted(files.items())):
        size = (directory / name).stat().st_size
        if size != entry["size"]:
            return f"{name} holds {size} bytes, the manifest says {entry['size']}"
        if count and i % count == index and f"{crc32_file(directory / name):08x}" != entry["crc32"]:
            return f"{name} has other contents than were saved (CRC-32 mismatch)"
    return None


def verify_legacy(directory: Path) -> str | None:
    """A checkpoint without a manifest: every byte range DCP's `.metadata` names must exist."""
    from packtune.checkpoint import SafeFileSystemReader
    from packtune.errors import CheckpointError

    try:
        metadata = SafeFileSystemReader(directory).read_metadata()
    except (CheckpointError, OSError, EOFError, ValueError) as e:  # ValueError: unpickling garbage
        return f".metadata does not read ({e})"
    except Exception as e:  # noqa: BLE001 - an unpickler fed damaged bytes raises anything
        return f".metadata does not read ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    if not (directory / "extra_rank0.pt").is_file():
        needed["extra_rank0.pt"] = 1
    for name, end in sorted(needed.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing (no {MANIFEST}: checked against .metadata)"
        if path.stat().st_size < end:
            return f"{name} holds {path.stat().st_size} bytes, .metadata needs {end} (no {MANIFEST})"
    return None


def describe(directory: Path) -> str:
    """'N files, X MB' as the manifest lists them (for the check-checkpoint report)."""
    files = read_manifest(directory)
    if isinstance(files, str):
        return "no manifest: sizes checked against .metadata"
    total = sum(entry["size"] for entry in files.values())
    return f"{len(files)} files, {total / 1e6:.1f} MB, CRC-32 verified"
