"""The `packtune data templatize` spec: labeled sources and, per task, FLAN-style templates.

    seed = 0                 # template draws, few-shot exemplars, weights and the output order
    format = "alpaca"        # or "messages"
    dedup = true             # drop exact duplicate records

    [[sources]]
    name = "reviews"
    path = "reviews.csv"     # CSV, JSONL, Parquet, ...: relative to the spec file
    columns = ["text", "label"]

    [[tasks]]
    name = "sentiment"
    source = "reviews"
    templates = ["Is this review positive or negative?\\n\\n{text}\\n\\n{options}",
                 {instruction = "Classify the sentiment.", input = "{text}"},
                 {instruction = "Write a {label} review.", inverted = true}]
    answer = "{label}"       # the output; `inverse_answer` ("{text}") for inverted templates
    label_column = "label"
    labels = {pos = "positive", neg = "negative"}   # verbaliser: raw label -> text
    options = true           # list the verbalised labels (or a list of your own) as "OPTIONS:"
    shots = [0, 2]           # per example, zero-shot or two exemplars of the same task
    cap = 1000               # at most this many source examples (FLAN's example cap)
    weight = 1.0             # records = weight x min(examples, cap): below 1 samples, above 1 repeats

Every key is checked: an unknown one is an error that suggests the closest valid key, and a
template naming an unknown column suggests the closest column.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packtune.datatools.instruction_templates import ENGINES, InstructionTemplate, TextTemplate
from packtune.errors import DataError

SPEC_KEYS = ("seed", "format", "dedup", "sources", "tasks")
SOURCE_KEYS = ("name", "path", "columns")
TASK_KEYS = ("name", "source", "templates", "answer", "inverse_answer", "engine", "label_column", "labels",
             "options", "shots", "cap", "weight")
TEMPLATE_KEYS = ("instruction", "input", "answer", "inverted")
OUTPUT_FORMATS = ("alpaca", "messages")
OPTIONS_VARIABLE = "options"
"""The template variable holding the "OPTIONS:" block, when a task lists options."""


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: Path
    columns: tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str
    templates: tuple[InstructionTemplate, ...]
    answer: TextTemplate
    inverse_answer: TextTemplate | None = None
    label_column: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    """Verbaliser: (raw label, text), in the order the options are listed."""
    options: tuple[str, ...] = ()
    shots: tuple[int, ...] = (0,)
    cap: int = 0
    """0: no cap."""
    weight: float = 1.0


@dataclass(frozen=True)
class Spec:
    path: Path
    seed: int
    format: str
    dedup: bool
    sources: dict[str, SourceSpec]
    tasks: tuple[TaskSpec, ...]


def _error(where: str, message: str) -> DataError:
    return DataError(f"{where}: {message}", "config")


def _check_keys(table: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise _error(where, f"expected a table, got {type(table).__name__}")
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(allowed)}"
            raise _error(where, f"unknown key {key!r}; {hint}")
    return table


def _typed(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
           default: Any = None) -> Any:
    if key not in table:
        if default is None:
            raise _error(where, f"missing key {key!r}")
        return default
    value = table[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise _error(where, f"{key} = {value!r}: expected {names}")
    return value


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec; every error names the spec file and the table at fault."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"spec file {path} does not exist", "missing_file") from None
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"{path}: invalid TOML: {e}", "config") from None
    _check_keys(raw, SPEC_KEYS, str(path))
    fmt = _typed(raw, "format", str, str(path), "alpaca")
    if fmt not in OUTPUT_FORMATS:
        raise _error(str(path), f"format = {fmt!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    sources = {}
    for i, table in enumerate(_typed(raw, "sources", list, str(path))):
        source = _source(table, path, f"{path}: sources[{i}]")
        if source.name in sources:
            raise _error(f"{path}: sources[{i}]", f"a second source named {source.name!r}")
        sources[source.name] = source
    tasks = [_task(table, sources, f"{path}: tasks[{i}]") for i, table in enumerate(_typed(raw, "tasks", list,
                                                                                              str(path)))]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise _error(str(path), f"task names must differ: {names}")
    if not tasks:
        raise _error(str(path), "no [[tasks]]")
    seed = _typed(raw, "seed", int, str(path), 0)
    return Spec(path, seed, fmt, _typed(raw, "dedup", bool, str(path), True), sources, tuple(tasks))


def _source(table: Any, spec_path: Path, where: str) -> SourceSpec:
    table = _check_keys(table, SOURCE_KEYS, where)
    columns = _typed(table, "columns", list, where)
    if not columns or not all(isinstance(c, str) for c in columns):
        raise _error(where, "columns: expected a non-empty list of column names")
    return SourceSpec(_typed(table, "name", str, where), spec_path.parent / _typed(table, "path", str, where),
                      tuple(columns))


def _task(table: Any, sources: dict[str, SourceSpec], where: str) -> TaskSpec:
    table = _check_keys(table, TASK_KEYS, where)
    name = _typed(table, "name", str, where)
    where = f"{where} ({name})"
    source_name = _typed(table, "source", str, where)
    if source_name not in sources:
        close = difflib.get_close_matches(source_name, list(sources), n=1)
        raise _error(where, f"source {source_name!r} is not a [[sources]] name"
                     + (f"; did you mean {close[0]!r}?" if close else f"; sources: {', '.join(sources)}"))
    engine = _typed(table, "engine", str, where, "format")
    if engine not in ENGINES:
        raise _error(where, f"engine = {engine!r}: expected one of {', '.join(ENGINES)}")
    columns = list(sources[source_name].columns)
    labels, options = _labels_and_options(table, columns, where)
    variables = columns + ([OPTIONS_VARIABLE] if options else [])
    text = lambda value, part: TextTemplate(value, engine, f"{where}: {part}")  # noqa: E731
    answer = text(_typed(table, "answer", str, where), "answer")
    inverse = text(table["inverse_answer"], "inverse_answer") if "inverse_answer" in table else None
    templates = []
    for i, item in enumerate(_typed(table, "templates", list, where)):
        at = f"templates[{i}]"
        if isinstance(item, str):
            item = {"instruction": item}
        item = _check_keys(item, TEMPLATE_KEYS, f"{where}: {at}")
        parts = {k: text(_typed(item, k, str, f"{where}: {at}"), f"{at}.{k}")
                 for k in ("instruction", "input", "answer") if k in item}
        inverted = _typed(item, "inverted", bool, f"{where}: {at}", False)
        if inverted and "answer" not in parts and inverse is None:
            raise _error(f"{where}: {at}", "an inverted template needs its own answer or the task's "
                         "inverse_answer (the input it asks for, e.g. \"{text}\")")
        templates.append(InstructionTemplate(f"{name}/{i}", parts["instruction"], parts.get("input"),
                                             parts.get("answer"), inverted))
    if not templates:
        raise _error(where, "templates: at least one template")
    for part in [answer, *([inverse] if inverse else []), *(p for t in templates for p in t.parts())]:
        part.check(variables)
    shots = table.get("shots", [0])
    shots = [shots] if isinstance(shots, int) and not isinstance(shots, bool) else shots
    if not isinstance(shots, list) or not shots or not all(isinstance(k, int) and k >= 0 for k in shots):
        raise _error(where, f"shots = {table.get('shots')!r}: expected a count or a list of counts >= 0")
    cap = _typed(table, "cap", int, where, 0)
    weight = float(_typed(table, "weight", (int, float), where, 1.0))
    if cap < 0 or weight <= 0:
        raise _error(where, "cap must be >= 0 (0: none) and weight > 0")
    return TaskSpec(name, source_name, tuple(templates), answer, inverse, table.get("label_column", ""),
                    labels, options, tuple(shots), cap, weight)


def _labels_and_options(table: dict[str, Any], columns: list[str], where: str):
    labels = _typed(table, "labels", dict, where, {})
    if not all(isinstance(v, str) for v in labels.values()):
        raise _error(where, "labels: every verbalised label must be a string")
    label_column = _typed(table, "label_column", str, where, "")
    if labels and not label_column:
        raise _error(where, "labels needs label_column, the column the raw labels are in")
    if label_column and label_column not in columns:
        close = difflib.get_close_matches(label_column, columns, n=1)
        raise _error(where, f"label_column {label_column!r} is not a column"
                     + (f"; did you mean {close[0]!r}?" if close else f"; columns: {', '.join(columns)}"))
    options = table.get("options", False)
    if options is True:
        if not labels:
            raise _error(where, "options = true lists the verbalised labels: give labels, or a list")
        options = list(labels.values())
    elif options is False:
        options = []
    elif not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise _error(where, f"options = {options!r}: expected true, false or a list of strings")
    return tuple(labels.items()), tuple(options)
