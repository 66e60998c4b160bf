"""Scores of a set of predictions: per record, overall and per task. The one evaluator behind
`packtune eval`, the `[train] eval_data` hook and `packtune demo`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from packtune.datatools.answer_metrics import answer_contained, exact_match, picked_option, rouge_l

METRICS = ("exact_match", "rouge_l", "contains")


@dataclass
class Totals:
    """Sums over a set of records; `option_*` over the records that list options."""

    records: int = 0
    exact_match: float = 0.0
    rouge_l: float = 0.0
    contains: float = 0.0
    option_records: int = 0
    option_correct: int = 0

    def add(self, scores: dict[str, Any]) -> None:
        self.records += 1
        for name in METRICS:
            setattr(self, name, getattr(self, name) + float(scores[name]))
        if "option_correct" in scores:
            self.option_records += 1
            self.option_correct += int(scores["option_correct"])

    def means(self) -> dict[str, Any]:
        n = max(self.records, 1)
        out: dict[str, Any] = {name: getattr(self, name) / n for name in METRICS}
        out["rows"] = self.records
        if self.option_records:
            out["option_accuracy"] = self.option_correct / self.option_records
            out["option_rows"] = self.option_records
        return out


@dataclass
class EvalReport:
    overall: Totals = field(default_factory=Totals)
    per_task: dict[str, Totals] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    """One entry per record: its prompt fields, reference, prediction and scores."""

    @property
    def accuracy(self) -> float:
        """Exact match over all records (0 for none)."""
        return self.overall.exact_match / self.overall.records if self.overall.records else 0.0

    @property
    def correct(self) -> int:
        return int(self.overall.exact_match)

    @property
    def total(self) -> int:
        return self.overall.records

    def task_accuracy(self) -> dict[str, float]:
        return {task: t.means()["exact_match"] for task, t in sorted(self.per_task.items())}

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        out = {**self.overall.means(), "correct": self.correct, "total": self.total,
               "per_task": {task: t.means() for task, t in sorted(self.per_task.items())}}
        if with_predictions:
            out["predictions"] = self.predictions
        return out

    def summary(self) -> str:
        """Metric lines, per task when records had one; the last line is `exact match: X%`."""
        lines = []
        if len(self.per_task) > 1 or (self.per_task and "" not in self.per_task):
            for task, totals in sorted(self.per_task.items()):
                lines.append(f"  {task or '(no task)'}: {_line(totals.means())}")
        lines.append(f"all {self.total} records: {_line(self.overall.means())}")
        lines.append(f"exact match: {100 * self.accuracy:.1f}%")
        return "\n".join(lines)


def _line(means: dict[str, Any]) -> str:
    text = (f"{means['rows']} records, exact match {100 * means['exact_match']:.1f}%, "
            f"ROUGE-L {100 * means['rouge_l']:.1f}, contains {100 * means['contains']:.1f}%")
    if "option_accuracy" in means:
        text += f", option accuracy {100 * means['option_accuracy']:.1f}% of {means['option_rows']}"
    return text


def score_record(reference: str, prediction: str, options: Sequence[str] | None = None,
              normalization: str = "squad") -> dict[str, Any]:
    scores: dict[str, Any] = {
        "exact_match": exact_match(reference, prediction, normalization),
        "rouge_l": rouge_l(reference, prediction),
        "contains": answer_contained(reference, prediction, normalization),
    }
    if options:
        chosen = picked_option(options, prediction, normalization)
        scores["option_picked"] = chosen
        scores["option_correct"] = chosen is not None and exact_match(reference, chosen, normalization)
    return scores


def score_predictions(records: Sequence[dict[str, Any]], predictions: Sequence[str],
                      normalization: str = "squad") -> EvalReport:
    """Score each prediction against its record's `output`; a record's `options` (list) adds option
    accuracy, its `task` a per-task line."""
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    report = EvalReport()
    for record, prediction in zip(records, predictions, strict=True):
        options = record.get("options") if isinstance(record.get("options"), list) else None
        scores = score_record(str(record["output"]), prediction, options, normalization)
        report.overall.add(scores)
        report.per_task.setdefault(str(record.get("task", "")), Totals()).add(scores)
        report.predictions.append({**{k: v for k, v in record.items()}, "prediction": prediction, **scores})
    return report
