"""JSONL and JSON files the data tools write: whole files atomically (a temporary file renamed
over the target), growing files by appending whole lines (a line cut short by a kill is ignored
when read back)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from packtune.atomic_write import write_atomic
from packtune.data.formats import decode_record, location
from packtune.data.readers import open_records
from packtune.errors import DataError


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    return write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_json(path: str | Path, value: Any) -> Path:
    return write_atomic(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as one line, flushed and synced, so a kill loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) of every record of a data file (JSONL, JSON, CSV, Parquet, ...); a malformed record
    is a DataError naming its file and line."""
    stream = open_records(path)
    return [(where, decode_record(where, raw)) for where, raw in
            ((location(stream.path, n, stream.unit), raw) for n, raw in stream.records)]


def read_appended(path: str | Path) -> list[dict[str, Any]]:
    """The records of a file grown by `append_jsonl`; a last line cut short by a kill is skipped (the
    next append starts on a fresh line)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"{path}:{number}: malformed JSON (not a file this tool appended to?)",
                            "malformed_json") from None
    return records


def repair_tail(path: str | Path) -> None:
    """Drop a last line cut short by a kill (no final newline), so the next append starts a fresh line."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
