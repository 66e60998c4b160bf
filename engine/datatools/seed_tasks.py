"""Seed tasks for Self-Instruct: its `seed_tasks.jsonl` (`instruction`, `instances` of
`input` / `output`, `is_classification`) or Alpaca records (`instruction`, `input`, `output`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packtune.datatools.jsonl_files import read_records
from packtune.errors import DataError


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    instances: tuple[tuple[str, str], ...]
    """(input, output) pairs; an empty input means the task needs none."""
    is_classification: bool = False


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r}: expected a string, got {type(value).__name__}",
                        "wrong_type")
    return value.strip()


def read_seed_tasks(path: str | Path) -> list[SeedTask]:
    tasks = []
    for where, record in read_records(path):
        instruction = _text(record, "instruction", where)
        if not instruction:
            raise DataError(f"{where}: missing field 'instruction' (seed tasks are Self-Instruct's "
                            "seed_tasks.jsonl records or Alpaca records)", "missing_field")
        if "instances" in record:
            instances = record["instances"]
            if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
                raise DataError(f"{where}: field 'instances': expected a list of {{input, output}} objects",
                                "wrong_type")
            pairs = tuple((_text(i, "input", where), _text(i, "output", where)) for i in instances)
        elif "output" in record:
            pairs = ((_text(record, "input", where), _text(record, "output", where)),)
        else:
            raise DataError(f"{where}: a seed task needs 'instances' (Self-Instruct) or 'output' (Alpaca)",
                            "missing_field")
        if not pairs or not any(out for _, out in pairs):
            raise DataError(f"{where}: the seed task has no instance with an output", "missing_field")
        tasks.append(SeedTask(instruction, pairs, bool(record.get("is_classification", False))))
    if not tasks:
        raise DataError(f"{path}: no seed tasks", "empty_file")
    return tasks
