"""File readers for data sources: each file type streams its records, so files larger than memory work.

A reader yields `(number, raw record)` pairs lazily. `number` is what errors cite (`unit`): the line of
a JSONL or CSV file (a CSV's header is line 1), the item of a JSON array, the record index of a
Parquet or Arrow file or of a `datasets.save_to_disk` folder (counted across its shards). A raw record
is the bytes of a JSONL line, a dict, or a `BadRecord`; `formats.decode_record` turns it into a dict or
raises, so that `skip_bad_records` can count a bad record. A file that cannot be read at all (missing,
empty, corrupt, truncated) is a DataError naming the file, here.

The type comes from the name: `.parquet` / `.pq`; `.arrow` / `.feather` / `.ipc` (Arrow IPC file
or stream format); `.csv`; a folder is a `save_to_disk` folder; anything else is JSONL, or a JSON
array when its first character is `[` (an array is parsed whole: use JSONL for large data).
`.gz` (stdlib gzip) and `.zst` (the zstandard extra) wrap JSONL, JSON and CSV. Parquet and Arrow
need the pyarrow extra (`pip install packtune[data]`).
"""

from __future__ import annotations

import csv
import gzip
import importlib
import io
import itertools
import json
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from packtune.data.formats import BadRecord
from packtune.errors import DataError

BATCH_RECORDS = 1024
"""Records converted to Python objects at a time from a Parquet or Arrow record batch."""

COMPRESSIONS = (".gz", ".zst")
KINDS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}

# Canonical fields each layout reads from a file with a schema: (required, optional). The list
# layouts need a list column; the others string columns (preference: either, strings or message lists).
LAYOUT_COLUMNS = {
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
    "sharegpt": (("conversations",), ()),
    "messages": (("messages",), ()),
    "preference": (("chosen", "rejected"), ("prompt",)),
}
STRING_TYPES = ("string", "large_string", "string_view", "null", "dictionary<values=string")
LIST_TYPES = ("list<", "large_list<", "fixed_size_list<", "list_view<", "null")


@dataclass
class RecordStream:
    """An opened data source: its records (read lazily, once) and, for typed files, its columns."""

    path: Path
    unit: str
    """What a record number counts in errors: line, item or record (see `formats.location`)."""
    records: Iterator[tuple[int, Any]]
    columns: dict[str, str] | None = None
    """Column name -> type name (CSV: every column a string); None for JSON."""


def file_kind(path: str | Path) -> str:
    """The reader for `path` by its name (a folder: saved_dataset); JSON vs JSONL is told later."""
    path = Path(path)
    if path.is_dir():
        return "saved_dataset"
    name = path.name.lower()
    base = next((name[: -len(c)] for c in COMPRESSIONS if name.endswith(c)), name)
    kind = KINDS.get(Path(base).suffix, "csv" if base.endswith(".csv") else "json")
    if kind in ("parquet", "arrow") and base != name:
        raise DataError(
            f"{path}: {kind} files are compressed inside; .gz/.zst apply to JSONL, JSON and CSV", "config"
        )
    return kind


def open_records(path: str | Path) -> RecordStream:
    """Open `path` (checked now: missing, empty, unreadable or lacking an extra) to read its records."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist", "missing_file")
    kind = file_kind(path)
    try:
        if kind == "saved_dataset":
            stream = _saved_dataset(path)
        elif kind in ("parquet", "arrow"):
            stream = (_parquet if kind == "parquet" else _arrow)(path)
        elif kind == "csv":
            stream = _csv(path)
        else:
            stream = _json(path)
    except _read_errors() as e:
        raise _unreadable(path, e, "") from None
    stream.records = _guarded(stream.path, stream.unit, stream.records)
    return stream


def count_records(path: str | Path) -> int:
    """The number of records `open_records(path)` yields (Parquet and Arrow from metadata; others read)."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "parquet":
        return _pyarrow(path, "parquet").ParquetFile(path).metadata.num_rows
    if kind in ("arrow", "saved_dataset"):
        files = _shards(path) if kind == "saved_dataset" else [path]
        return sum(batch.num_rows for f in files for batch in _arrow_batches(f)[1])
    return sum(1 for _ in open_records(path).records)


def check_columns(stream: RecordStream, fmt: str, fields: dict[str, str]) -> None:
    """A file with a schema must have the columns layout `fmt` reads, of the right type."""
    if stream.columns is None:
        return
    required, optional = LAYOUT_COLUMNS[fmt]
    wants = {"sharegpt": "a list", "messages": "a list", "preference": "a string or a list"}
    want = wants.get(fmt, "a string")
    kinds = {"a string": STRING_TYPES, "a list": LIST_TYPES, "a string or a list": STRING_TYPES + LIST_TYPES}
    for canonical in required + optional:
        name = fields[canonical]
        kind = stream.columns.get(name)
        if kind is None:
            if canonical in required:
                raise DataError(
                    f"{stream.path}: no column {name!r}, which the {fmt} format needs; columns: "
                    f"{', '.join(stream.columns)} (data.field_map renames fields)",
                    "wrong_schema",
                )
        elif not kind.startswith(kinds[want]):
            raise DataError(f"{stream.path}: column {name!r} is {kind}, expected {want}", "wrong_schema")


def _guarded(path: Path, unit: str, records: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """`records`, with a failure while reading (truncated, corrupt) as a DataError naming the file."""
    number = None
    try:
        for number, raw in records:
            yield number, raw
    except _read_errors() as e:
        where = "" if number is None else f" after {unit} {number}"
        raise _unreadable(path, e, where) from None


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a broken file raises: the stdlib's, and those of the extras once imported."""
    errors: list[type[BaseException]] = [OSError, EOFError, UnicodeDecodeError, zlib.error, csv.Error]
    errors.append(DataError)
    for module, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        if sys.modules.get(module) is not None:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _unreadable(path: Path, e: BaseException, where: str) -> DataError:
    if isinstance(e, DataError):
        return e
    if isinstance(e, FileNotFoundError):
        return DataError(f"data file {path} does not exist", "missing_file")
    if isinstance(e, UnicodeDecodeError):
        return DataError(f"{path}: invalid UTF-8{where}", "invalid_utf8")
    detail = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return DataError(
        f"{path}: cannot read the file{where} (corrupt or truncated?): {detail}", "unreadable_file"
    )


def _empty(path: Path, detail: str = "") -> DataError:
    return DataError(f"{path}: the file is empty{detail}", "empty_file")


def _import(module: str, path: Path):
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DataError(
            f"{path}: reading this file needs {package}: pip install {package} (or packtune[data])",
            "missing_extra",
        ) from None


def _pyarrow(path: Path, submodule: str = ""):
    pa = _import("pyarrow", path)
    return _import(f"pyarrow.{submodule}", path) if submodule else pa


def _open_binary(path: Path) -> BinaryIO:
    """The decompressed bytes of `path`, streamed."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(open(path, "rb"), _import("zstandard", path)))
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst stream of one or more frames. zstandard's own stream_reader
    ends quietly at a truncated frame; this raises EOFError, as gzip does."""

    def __init__(self, raw: BinaryIO, zstd: Any) -> None:
        self.raw, self.zstd = raw, zstd
        self.frame = zstd.ZstdDecompressor().decompressobj()
        self.pending, self.offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.offset == len(self.pending):
            data = self.raw.read(1 << 16)
            if not data:
                if not self.frame.eof:
                    raise EOFError("the zstd data ends inside a frame (truncated)")
                return 0
            self.pending, self.offset = b"", 0
            while data:
                if self.frame.eof:  # the next frame
                    self.frame = self.zstd.ZstdDecompressor().decompressobj()
                self.pending += self.frame.decompress(data)
                data = self.frame.unused_data if self.frame.eof else b""
        n = min(len(buffer), len(self.pending) - self.offset)
        buffer[:n] = self.pending[self.offset : self.offset + n]
        self.offset += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _json(path: Path) -> RecordStream:
    stream = _open_binary(path)
    try:
        lines = ((n, _chomp(line)) for n, line in enumerate(stream, start=1) if line.strip())
        first = next(lines, None)
        if first is None:
            raise _empty(path)
        if first[1].lstrip()[:1] == b"[":
            # Blank leading lines kept as newlines, so JSON's line numbers match the file's.
            data = b"\n" * (first[0] - 1) + first[1] + b"\n" + stream.read()
            stream.close()
            return RecordStream(path, "item", iter(_read_json_array(path, data)))
    except BaseException:
        stream.close()
        raise
    return RecordStream(path, "line", _closing(stream, itertools.chain([first], lines)))


def _chomp(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\n") else line


def _closing(handle: Any, records: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    with handle:
        yield from records


def _read_json_array(path: Path, data: bytes) -> list[tuple[int, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}", "invalid_utf8") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})", "malformed_json"
        ) from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of records or JSON lines", "malformed_json")
    if not items:
        raise _empty(path, " (an empty JSON array)")
    return list(enumerate(items))


def _csv(path: Path) -> RecordStream:
    """CSV with a header line; every cell a string, so only the flat layouts (not sharegpt/messages)."""
    csv.field_size_limit(2**31 - 1)  # long responses exceed the default 128 KiB per cell
    text = io.TextIOWrapper(_open_binary(path), encoding="utf-8", newline="")
    try:
        reader = csv.reader(text)
        header = next((cells for cells in reader if cells), None)
        if header is None:
            raise _empty(path)
        records = _csv_records(reader, header)
        first = next(records, None)
        if first is None:
            raise _empty(path, " (a header and no records)")
    except BaseException:
        text.close()
        raise
    columns = {name: "string" for name in header}
    return RecordStream(path, "line", _closing(text, itertools.chain([first], records)), columns)


def _csv_records(reader: Any, header: list[str]) -> Iterator[tuple[int, Any]]:
    end = reader.line_num
    for cells in reader:
        start, end = end + 1, reader.line_num
        if not cells:
            continue
        if len(cells) != len(header):
            message = f"expected {len(header)} columns ({', '.join(header)}), got {len(cells)}"
            yield start, BadRecord(message, "wrong_columns")
        else:
            yield start, dict(zip(header, cells, strict=True))


def _parquet(path: Path) -> RecordStream:
    parquet = _pyarrow(path, "parquet")
    file = parquet.ParquetFile(path)
    if file.metadata.num_rows == 0:
        raise _empty(path, " (no records)")
    batches = file.iter_batches(batch_size=BATCH_RECORDS)
    return RecordStream(path, "record", _batch_records(batches), _columns(file.schema_arrow))


def _arrow(path: Path) -> RecordStream:
    schema, batches = _arrow_batches(path)
    return _arrow_stream(path, schema, batches)


def _arrow_batches(path: Path) -> tuple[Any, Iterator[Any]]:
    """(schema, record batches) of an Arrow IPC file (random access) or stream (save_to_disk's)."""
    pa = _pyarrow(path)
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)


def _arrow_stream(path: Path, schema: Any, batches: Iterator[Any]) -> RecordStream:
    batches = iter(batches)
    first = next((b for b in batches if b.num_rows), None)
    if first is None:
        raise _empty(path, " (no records)")
    records = _batch_records(itertools.chain([first], batches))
    return RecordStream(path, "record", records, _columns(schema))


def _batch_records(batches: Iterator[Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    number = 0
    for batch in batches:
        for start in range(0, batch.num_rows, BATCH_RECORDS):
            for record in batch.slice(start, BATCH_RECORDS).to_pylist():
                yield number, record
                number += 1


def _columns(schema: Any) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def _saved_dataset(path: Path) -> RecordStream:
    files = _shards(path)
    schema, first = _arrow_batches(files[0])
    rest = (batch for f in files[1:] for batch in _arrow_batches(f)[1])
    return _arrow_stream(path, schema, itertools.chain(first, rest))


def _shards(path: Path) -> list[Path]:
    """The Arrow files of a `datasets.save_to_disk` folder, in order (state.json lists them)."""
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
        raise DataError(
            f"{path}: a saved DatasetDict; set the path to one split: {', '.join(splits)}", "config"
        )
    state = path / "state.json"
    if state.exists():
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{state}: not a datasets state.json ({e})", "unreadable_file") from None
        files = [path / name for name in names]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(
            f"{path}: a folder without .arrow files (not a datasets.save_to_disk folder)", "empty_file"
        )
    return files
