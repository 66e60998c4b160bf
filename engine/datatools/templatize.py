"""`packtune data templatize`: labeled examples turned into instruction records, the FLAN way.

Per task: its source examples (label verbalised, empty or unknown labels dropped), at most `cap`
of them (a seeded sample), `weight` times over; per record one template and one shot count drawn
with the spec's seed, few-shot exemplars drawn from the task's other examples (never the example
itself, nor one that renders the same), options listed as FLAN lists them. Exact duplicate records
are dropped and the records shuffled. The report counts records per task, template and shot count, and
what was dropped and why.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from packtune.datatools.instruction_templates import InstructionTemplate, pick_template
from packtune.datatools.jsonl_files import read_records
from packtune.datatools.templatize_spec import OPTIONS_VARIABLE, Spec, TaskSpec
from packtune.errors import DataError


@dataclass(frozen=True)
class Rendered:
    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


@dataclass
class TaskReport:
    source_records: int = 0
    records: int = 0
    templates: Counter = field(default_factory=Counter)
    shots: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"source_rows": self.source_records, "rows": self.records,
                "templates": dict(sorted(self.templates.items())),
                "shots": {str(k): v for k, v in sorted(self.shots.items())}, "dropped": dict(self.dropped)}


def options_block(options: Sequence[str]) -> str:
    """FLAN's listing of the answer options."""
    return "OPTIONS:\n" + "\n".join(f"- {o}" for o in options)


def render_example(task: TaskSpec, template: InstructionTemplate, context: dict[str, str]) -> Rendered:
    """One example asked with one template; the options block goes where the template puts
    `{options}`, else after the prompt (never for inverted templates: the options are labels)."""
    context = dict(context)
    listed = bool(task.options) and not template.inverted
    if task.options:
        context[OPTIONS_VARIABLE] = options_block(task.options) if listed else ""
    instruction = template.instruction.render(context)
    text = template.input.render(context) if template.input else ""
    answer = template.answer or (task.inverse_answer if template.inverted else task.answer)
    if listed and not any(part.uses(OPTIONS_VARIABLE) for part in template.parts()):
        if text:
            text = f"{text}\n\n{options_block(task.options)}"
        else:
            instruction = f"{instruction}\n\n{options_block(task.options)}"
    return Rendered(instruction.strip(), text.strip(), answer.render(context).strip())


def with_exemplars(example: Rendered, exemplars: Sequence[Rendered]) -> Rendered:
    """Few-shot: each exemplar's prompt and `Answer: ...`, then the example's instruction (its input
    stays in the input field)."""
    if not exemplars:
        return example
    shots = "\n\n".join(f"{e.prompt}\nAnswer: {e.output}" for e in exemplars)
    return Rendered(f"{shots}\n\n{example.instruction}", example.input, example.output)


def _examples(task: TaskSpec, columns: Sequence[str], records: list[tuple[str, dict[str, Any]]],
              report: TaskReport) -> list[dict[str, str]]:
    """Each record's template context (label verbalised); records with an empty value or an unknown
    label dropped and counted."""
    labels = dict(task.labels)
    out = []
    for where, record in records:
        missing = [c for c in columns if c not in record]
        if missing:
            raise DataError(f"{where}: no column {missing[0]!r} (task {task.name}); columns: "
                            f"{', '.join(map(str, record))}", "missing_field")
        context = {c: "" if record[c] is None else str(record[c]) for c in columns}
        if any(not v.strip() for v in context.values()):
            report.dropped["empty_value"] += 1
            continue
        if labels:
            raw = context[task.label_column]
            if raw not in labels:
                report.dropped["unknown_label"] += 1
                continue
            context[task.label_column] = labels[raw]
        out.append(context)
    return out


def _selection(n: int, cap: int, weight: float, rng: random.Random, report: TaskReport) -> list[int]:
    """Indices of the examples used, in order: a seeded sample of `cap`, then `weight` times over."""
    indices = list(range(n))
    if cap and n > cap:
        indices = sorted(rng.sample(indices, cap))
        report.dropped["over_cap"] += n - cap
    copies, extra = divmod(round(weight * len(indices)), len(indices) or 1)
    chosen = indices * copies + sorted(rng.sample(indices, extra))
    if weight < 1:
        report.dropped["weight"] += len(indices) - len(chosen)
    return chosen


def _exemplars(task: TaskSpec, template: InstructionTemplate, examples: list[dict[str, str]], index: int,
               example: Rendered, shots: int, rng: random.Random) -> list[Rendered]:
    """Up to `shots` other examples of the task in `template`: never example `index` itself, nor one
    that renders the same. A few spare draws cover those; a small task is searched whole."""
    if shots == 0:
        return []
    n = len(examples)

    def collect(order: Sequence[int]) -> list[Rendered]:
        found: list[Rendered] = []
        for i in order:
            if len(found) == shots:
                break
            rendered = render_example(task, template, examples[i]) if i != index else example
            if rendered != example and rendered not in found:
                found.append(rendered)
        return found

    draws = rng.sample(range(n), min(n, shots + 4))
    exemplars = collect(draws)
    if len(exemplars) < shots and n > len(draws):
        exemplars = collect(rng.sample(range(n), n))
    return exemplars


def templatize_task(task: TaskSpec, columns: Sequence[str], records: list[tuple[str, dict[str, Any]]],
                    rng: random.Random, output_format: str, report: TaskReport) -> list[dict[str, Any]]:
    """One task's records, before duplicates are dropped; counts go to `report`."""
    report.source_records = len(records)
    examples = _examples(task, columns, records, report)
    out = []
    for index in _selection(len(examples), task.cap, task.weight, rng, report):
        template = pick_template(rng, task.templates)
        shots = rng.choice(task.shots)
        example = render_example(task, template, examples[index])
        exemplars = _exemplars(task, template, examples, index, example, shots, rng)
        if len(exemplars) < shots:
            report.dropped["too_few_exemplars"] += 1
            continue
        report.templates[template.id] += 1
        report.shots[shots] += 1
        out.append(to_record(with_exemplars(example, exemplars), output_format, task, template, shots))
    return out


def to_record(r: Rendered, output_format: str, task: TaskSpec, template: InstructionTemplate,
           shots: int) -> dict[str, Any]:
    """An Alpaca or messages record `packtune train` reads, tagged with its task, template and shots;
    `options` (when listed) lets `packtune eval` score option accuracy."""
    if output_format == "messages":
        record: dict[str, Any] = {"messages": [{"role": "user", "content": r.prompt},
                                            {"role": "assistant", "content": r.output}]}
    else:
        record = {"instruction": r.instruction, "input": r.input, "output": r.output}
    record.update(task=task.name, template=template.id, shots=shots)
    if task.options and not template.inverted:
        record["options"] = list(task.options)
    return record


def _content(record: dict[str, Any]) -> tuple[str, ...]:
    if "messages" in record:
        return tuple(m["content"] for m in record["messages"])
    return record["instruction"], record["input"], record["output"]


def templatize(spec: Spec, seed: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records of `spec` (shuffled) and the report."""
    rng = random.Random(spec.seed if seed is None else seed)
    cache: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    reports: dict[str, TaskReport] = {}
    records: list[dict[str, Any]] = []
    for task in spec.tasks:
        if task.source not in cache:
            cache[task.source] = read_records(spec.sources[task.source].path)
        report = reports[task.name] = TaskReport()
        columns = spec.sources[task.source].columns
        records += templatize_task(task, columns, cache[task.source], rng, spec.format, report)
    kept, seen = [], set()
    for record in records:
        key = _content(record)
        if spec.dedup and key in seen:
            task_report = reports[record["task"]]
            task_report.dropped["duplicate"] += 1
            task_report.templates[record["template"]] -= 1
            task_report.shots[record["shots"]] -= 1
            continue
        seen.add(key)
        kept.append(record)
    rng.shuffle(kept)
    for record in kept:
        reports[record["task"]].records += 1
    return kept, {"spec": str(spec.path), "rows": len(kept), "format": spec.format,
                  "tasks": {name: r.to_dict() for name, r in reports.items()}}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['rows']} records ({report['format']}) from {report['spec']}"]
    for name, task in report["tasks"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in task["dropped"].items() if v) or "none"
        templates = ", ".join(f"{k.split('/')[-1]}:{v}" for k, v in task["templates"].items())
        lines.append(f"  {name}: {task['rows']} records from {task['source_rows']} source records; "
                     f"per template {templates}; dropped: {dropped}")
    return "\n".join(lines)
