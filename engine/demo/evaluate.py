"""Exact-match scoring of generated answers against the demo tasks' known answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def normalise(text: str) -> str:
    """Whitespace collapsed and trimmed, one trailing period dropped; case kept (uppercase is a task)."""
    text = " ".join(text.split())
    return text[:-1].rstrip() if text.endswith(".") else text


@dataclass
class ExactMatch:
    correct: int = 0
    total: int = 0
    per_task: dict[str, list[int]] = field(default_factory=dict)
    """task -> [correct, total]."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def task_accuracy(self) -> dict[str, float]:
        return {task: c / n for task, (c, n) in sorted(self.per_task.items())}

    def to_dict(self) -> dict[str, object]:
        return {"exact_match": self.accuracy, "correct": self.correct, "total": self.total,
                "per_task": self.task_accuracy()}


def score(rows: Sequence[dict[str, str]], predictions: Sequence[str]) -> ExactMatch:
    """Compare each prediction with its row's `output` after `normalise`; rows may carry a `task`."""
    if len(rows) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    result = ExactMatch()
    for row, prediction in zip(rows, predictions, strict=True):
        hit = int(normalise(prediction) == normalise(row["output"]))
        counts = result.per_task.setdefault(row.get("task", "all"), [0, 0])
        counts[0] += hit
        counts[1] += 1
        result.correct += hit
        result.total += 1
    return result
