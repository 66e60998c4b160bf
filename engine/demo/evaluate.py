"""The demo's scoring: `packtune eval`'s evaluator, with the `text` normalization (case and
articles are the answer here: "A B" is the uppercase task's, "a" a letter to reverse)."""

from __future__ import annotations

from collections.abc import Sequence

from packtune.datatools.answer_metrics import text_normalize as normalise
from packtune.datatools.scoring import EvalReport, score_predictions

__all__ = ["normalise", "score"]


def score(records: Sequence[dict[str, str]], predictions: Sequence[str]) -> EvalReport:
    """Each prediction against its record's `output`; records may carry a `task`."""
    return score_predictions(records, predictions, normalization="text")
