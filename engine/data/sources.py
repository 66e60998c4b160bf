"""Data sources: `[data] path` or several `[[data.sources]]`, each opened, its layout told, and mixed.

Mixing rule. A source of n records with weight w contributes int(w) copies of every record, plus one
more copy of round((w - int(w)) * n) of its records, drawn without replacement by
`numpy.random.default_rng([data.mix_seed, source index])`. So weight 1 takes the source as it is,
2 twice, 0.5 a seeded half, 2.25 every record twice and a seeded quarter a third time. A fractional
weight counts the records first (Parquet and Arrow from their metadata, other files by a read).
Records are counted before tokenization, so a malformed record drawn is counted (or raised) like any.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from packtune.config import DataConfig
from packtune.data.formats import decode_record, detect_format, field_names, location
from packtune.data.readers import check_columns, count_records, open_records
from packtune.errors import DataError


def resolve_sources(cfg: DataConfig) -> list[dict[str, Any]]:
    """The sources of a run (checked by `DataConfig.check`), with `[data]` format and field_map filled
    in where unset: [{"path", "format", "field_map", "weight"}], JSON-serialisable (they are part of
    the cache key)."""
    return [
        {"path": str(source.path), "format": cfg.format if source.format is None else source.format,
         "field_map": list(cfg.field_map if source.field_map is None else source.field_map),
         "weight": source.weight}
        for _, source in cfg.sources_given()
    ]


class OpenSource:
    """One source being read: its records (streamed once), resolved layout, fields and counts."""

    def __init__(self, spec: dict[str, Any], skip_bad_records: bool) -> None:
        self.spec = spec
        self.stream = open_records(spec["path"])
        self.fields = field_names(spec["field_map"])
        self.read = 0
        """Records read from the file so far."""
        self.records = 0
        """Records after weighting (copies included) sent to tokenization so far."""
        peeked: list[tuple[int, Any]] = []
        self.format = spec["format"]
        if self.format == "auto":
            self.format = self._detect(peeked, skip_bad_records)
        check_columns(self.stream, self.format, self.fields)
        self._records = itertools.chain(peeked, self.stream.records)

    @property
    def unit(self) -> str:
        return self.stream.unit

    def chunks(self, size: int, index: int, mix_seed: int) -> Iterator[tuple[int, list[tuple[int, Any]]]]:
        """(copies, records) for every `size` records read, the records grouped by how many copies the
        mixing rule gives them; records with no copy are left out (see the module docstring)."""
        whole, fraction = divmod(self.spec["weight"], 1.0)
        extra = None
        if fraction:
            n = count_records(self.spec["path"])
            extra = np.zeros(n, dtype=bool)
            rng = np.random.default_rng([mix_seed, index])
            extra[rng.choice(n, round(fraction * n), replace=False)] = True
        while chunk := list(itertools.islice(self._records, size)):
            groups: dict[int, list[tuple[int, Any]]] = {}
            for ordinal, record in enumerate(chunk, start=self.read):
                copies = int(whole) + int(extra is not None and ordinal < len(extra) and extra[ordinal])
                if copies:
                    groups.setdefault(copies, []).append(record)
            self.read += len(chunk)
            for copies, records in sorted(groups.items()):
                self.records += copies * len(records)
                yield copies, records

    def _detect(self, peeked: list[tuple[int, Any]], skip_bad_records: bool) -> str:
        """The layout of the first readable record; the records read to find it are kept in `peeked`."""
        for number, raw in self.stream.records:
            peeked.append((number, raw))
            where = location(self.stream.path, number, self.unit)
            try:
                return detect_format(decode_record(where, raw), self.fields, where)
            except DataError:
                if not skip_bad_records:
                    raise
        raise DataError(
            f"{self.stream.path}: no record is readable, so the format cannot be detected", "empty_file"
        )
