"""A deterministic FLAN-style instruction mix over the demo tasks, written as Alpaca JSONL.

Which split an instance belongs to is decided by a hash of (task, input), not by the order of
drawing, so the held-out instances can never appear in training whatever the sizes and seeds:
the two splits are disjoint by construction, and a test checks it. The held-out split is
evaluated twice: with the training phrasings (unseen instances) and with each task's held-out
phrasing (unseen instances and an instruction the model never saw).

The records are rendered by `packtune data templatize`'s machinery: each task is a templatize task
(`task_spec`) over the columns `x` and `answer`, its phrasings the templates, drawn per instance
with the same `pick_template`. Only the instances come from code (drawn, not read from a file),
so the split stays a function of the hash above.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Mapping
from pathlib import Path

from packtune.atomic_write import write_atomic
from packtune.datatools.instruction_templates import InstructionTemplate, TextTemplate, pick_template
from packtune.datatools.templatize import render_example
from packtune.datatools.templatize_spec import TaskSpec
from packtune.demo.tasks import TASKS, Task

HELDOUT_SHARE = 8
"""One instance in this many (by hash) belongs to the held-out split."""


def is_heldout(task: str, x: str) -> bool:
    digest = hashlib.sha1(f"{task}\x00{x}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % HELDOUT_SHARE == 0


def task_spec(task: Task) -> TaskSpec:
    """The demo task as a templatize task: a phrasing with `{x}` embeds the instance, one without
    leaves it to the Alpaca `input` field; the answer is the `answer` column."""
    where = f"demo task {task.name}"
    x = TextTemplate("{x}", "format", where)
    templates = tuple(InstructionTemplate(f"{task.name}/{i}", TextTemplate(p, "format", where),
                                          None if "{x}" in p else x)
                      for i, p in enumerate(task.phrasings))
    return TaskSpec(task.name, "demo", templates, TextTemplate("{answer}", "format", where))


def render(spec: TaskSpec, template: InstructionTemplate, x: str, answer: str) -> dict[str, str]:
    """One Alpaca record of the demo task `spec`."""
    r = render_example(spec, template, {"x": x, "answer": answer})
    return {"instruction": r.instruction, "input": r.input, "output": r.output, "task": spec.name}


EXHAUSTED = 200
"""Draws of the split in a row that all hit an instance already taken: its space is used up."""


def _instances(task: Task, rng: random.Random, heldout: bool, count: int) -> Iterator[tuple[str, str]]:
    """`count` instances of one split, distinct until the split's instance space is used up.

    The held-out split then stops short; the training split starts another pass over the space,
    so a task with few instances (add: about 7,000 training sums) still gets its share of the
    records instead of a third of it.
    """
    seen: set[str] = set()
    produced = misses = 0
    while produced < count:
        x, answer = task.draw(rng)
        if is_heldout(task.name, x) != heldout:
            continue
        if x in seen:
            misses += 1
            if misses >= EXHAUSTED:
                if heldout:
                    return
                seen.clear()
            continue
        misses = 0
        seen.add(x)
        produced += 1
        yield x, answer


def make_split(split: str, records_per_task: int, seed: int = 0,
               task_weights: Mapping[str, float] | None = None) -> list[dict[str, str]]:
    """Records of one split, tasks interleaved in a seeded shuffle.

    `split` is "train" (training phrasings), "heldout" (unseen instances, training phrasings)
    or "heldout_phrasing" (unseen instances, each task's held-out phrasing). A task named in
    `task_weights` gets `round(weight * records_per_task)` records instead of `records_per_task`.
    """
    if split not in ("train", "heldout", "heldout_phrasing"):
        raise ValueError(f"unknown split {split!r}: expected train, heldout or heldout_phrasing")
    weights = dict(task_weights or {})
    unknown = sorted(set(weights) - {task.name for task in TASKS})
    if unknown:
        raise ValueError(f"task_weights names unknown tasks {unknown}")
    records = []
    for index, task in enumerate(TASKS):
        rng = random.Random(f"{seed}/{split}/{index}")
        heldout = split != "train"
        count = round(weights.get(task.name, 1.0) * records_per_task)
        spec = task_spec(task)
        *train_templates, heldout_template = spec.templates
        for x, answer in _instances(task, rng, heldout, count):
            if split == "heldout_phrasing":
                template = heldout_template
            else:
                template = pick_template(rng, train_templates)
            records.append(render(spec, template, x, answer))
    random.Random(f"{seed}/{split}/order").shuffle(records)
    return records


ALPACA_FIELDS = ("instruction", "input", "output")


def write_jsonl(records: list[dict[str, str]], path: str | Path,
                fields: tuple[str, ...] = ALPACA_FIELDS) -> Path:
    """Write `fields` of each record; by default plain Alpaca records, which every SFT data loader reads."""
    return write_atomic(path, "".join(json.dumps({k: record[k] for k in fields}, ensure_ascii=False) + "\n"
                                      for record in records))


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
