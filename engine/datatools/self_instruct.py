"""`packtune data self-instruct`: new instruction data from a few seed tasks, the Self-Instruct /
Alpaca way.

Each round prompts the generator (a batch of requests: one batched decode for a local model,
concurrent HTTP requests for a server) with seed and already generated
instructions to propose new ones; a proposal is dropped by a heuristic (length, words a text model
cannot act on, a non-text start) or when its ROUGE-L against any instruction kept so far (seeds
included; ones accepted earlier in the round too) reaches 0.7. Each survivor is classified
(classification task or not) and gets an instance: input then output, or for a classification
task output then input. Kept records are appended to `--out` as Alpaca records as they come, so a rerun
with the same `--out` continues where the last one stopped, counting `--num` over the whole file
and never repeating an instruction (the file's instructions are kept ones). The run stops at
`--num` kept records or after `--max-requests` generator requests (this run), and says which.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from packtune.datatools.instruction_filter import SimilarityIndex, rejection
from packtune.datatools.jsonl_files import append_jsonl, read_appended, repair_tail, write_json
from packtune.datatools.seed_tasks import SeedTask
from packtune.datatools.self_instruct_prompts import (
    classify_prompt,
    instance_prompt,
    parse_classification,
    parse_instance,
    parse_proposals,
    propose_prompt,
)


class Generator(Protocol):
    def complete(self, prompts: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True)
class SelfInstructOptions:
    num: int
    """Kept instructions wanted in `--out`, counting those already there."""
    max_requests: int
    """Generator requests (one per prompt) this run may make."""
    batch_size: int = 4
    """Proposal prompts per round."""
    prompt_instructions: int = 8
    """Example instructions per proposal prompt (Self-Instruct: 8)..."""
    machine_instructions: int = 2
    """... of which this many generated ones, once there are (Self-Instruct: 2)."""
    instance_examples: int = 2
    """Seed tasks shown in the classification and instance prompts."""
    seed: int = 0


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".report.json")


class SelfInstruct:
    def __init__(self, generator: Generator, seeds: Sequence[SeedTask], out: str | Path,
                 options: SelfInstructOptions) -> None:
        self.generator, self.seeds, self.out, self.options = generator, list(seeds), Path(out), options
        self.out.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.out)
        previous = read_appended(self.out)
        self.resumed_from = len(previous)
        self.generated = [str(r["instruction"]) for r in previous]
        self.index = SimilarityIndex([s.instruction for s in self.seeds] + self.generated)
        self.rng = random.Random(f"{options.seed}/{len(previous)}")
        self.requests = 0
        self.dropped: Counter = Counter()
        self.proposed = 0

    def _call(self, prompts: list[str]) -> list[str]:
        self.requests += len(prompts)
        return self.generator.complete(prompts) if prompts else []

    def _examples(self) -> list[str]:
        o = self.options
        machine = self.rng.sample(self.generated, min(o.machine_instructions, len(self.generated)))
        human = [s.instruction for s in self.rng.sample(self.seeds, min(o.prompt_instructions - len(machine),
                                                                           len(self.seeds)))]
        examples = human + machine
        self.rng.shuffle(examples)
        return examples

    def _instance_examples(self, classification: bool | None = None) -> list[SeedTask]:
        pool = [s for s in self.seeds if classification is None or s.is_classification == classification]
        pool = pool or self.seeds
        return self.rng.sample(pool, min(self.options.instance_examples, len(pool)))

    def _accepted(self, responses: list[str], room: int) -> list[str]:
        accepted = []
        for response in responses:
            proposals = parse_proposals(response)
            if not proposals:
                self.dropped["unparsable"] += 1
            for instruction in proposals:
                self.proposed += 1
                reason = rejection(instruction, self.index)
                if reason is None and len(accepted) == room:
                    reason = "beyond_num"
                if reason:
                    self.dropped[reason] += 1
                    continue
                self.index.add(instruction)
                accepted.append(instruction)
        return accepted

    def run(self) -> dict[str, Any]:
        o = self.options
        kept = self.resumed_from
        stopped = f"reached --num {o.num} kept instructions"
        while kept < o.num:
            budget = o.max_requests - self.requests
            if budget <= 0:
                stopped = f"reached --max-requests {o.max_requests} generator requests"
                break
            prompts = [propose_prompt(self._examples()) for _ in range(min(o.batch_size, budget))]
            responses = self._call(prompts)
            accepted = self._accepted(responses, o.num - kept)
            affordable = (o.max_requests - self.requests) // 2
            if len(accepted) > affordable:
                self.dropped["out_of_requests"] += len(accepted) - affordable
                accepted = accepted[:affordable]
            answers = self._call([classify_prompt(a, self._instance_examples()) for a in accepted])
            classes = [parse_classification(a) for a in answers]
            responses = self._call([instance_prompt(a, self._instance_examples(c), c)
                                    for a, c in zip(accepted, classes, strict=True)])
            for instruction, classification, response in zip(accepted, classes, responses, strict=True):
                instance = parse_instance(response, classification)
                if instance is None:
                    self.dropped["no_instance"] += 1
                    continue
                append_jsonl(self.out, {"instruction": instruction, "input": instance[0],
                                        "output": instance[1], "is_classification": classification})
                self.generated.append(instruction)
                kept += 1
        return self._report(kept, stopped)

    def _report(self, kept: int, stopped: str) -> dict[str, Any]:
        path = report_path(self.out)
        runs = []
        if path.exists():
            try:
                runs = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
            except (json.JSONDecodeError, AttributeError):
                runs = []
        this_run = {"kept_before": self.resumed_from, "kept_after": kept, "new": kept - self.resumed_from,
                    "requests": self.requests, "proposed": self.proposed, "dropped": dict(self.dropped),
                    "stopped": stopped}
        report = {"out": str(self.out), "kept": kept, "num": self.options.num, "stopped": stopped,
                  "runs": [*runs, this_run]}
        write_json(path, report)
        return report


def format_report(report: dict[str, Any]) -> str:
    run = report["runs"][-1]
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(run["dropped"].items())) or "none"
    return (f"{report['kept']} instructions in {report['out']} ({run['new']} new this run, "
            f"{run['kept_before']} there before); {run['proposed']} proposed in {run['requests']} requests; "
            f"dropped: {dropped}\nstopped: {report['stopped']}")
