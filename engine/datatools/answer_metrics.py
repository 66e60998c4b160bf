"""Per-answer metrics: SQuAD-normalized exact match, ROUGE-L, answer contained, option picked.

ROUGE-L is an exact re-implementation of Google's `rouge-score` (`RougeScorer(["rougeL"])`, no
stemmer), the scorer Self-Instruct filters with: lowercase, every run of characters outside
[a-z0-9] a separator, the F-measure of the longest common subsequence of the two token lists. It is
re-implemented so the core needs no extra package (rouge-score pulls in nltk); the tests compare
it with rouge-score on real text.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's answer normalization: lowercase, punctuation and articles removed, spaces collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def text_normalize(text: str) -> str:
    """Whitespace collapsed and trimmed, one trailing period dropped; case and articles kept (for
    answers where they matter, such as the demo's letter tasks)."""
    text = " ".join(text.split())
    return text[:-1].rstrip() if text.endswith(".") else text


NORMALIZERS = {"squad": squad_normalize, "text": text_normalize}
"""`packtune eval --normalize` choices."""


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (one row of the table kept)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_tokens(reference: Sequence[str], prediction: Sequence[str]) -> float:
    """ROUGE-L F-measure of already tokenized texts (see `rouge_tokens`)."""
    if not reference or not prediction:
        return 0.0
    lcs = lcs_length(reference, prediction)
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F-measure, equal to `rouge_score.rouge_scorer.RougeScorer(["rougeL"]).score(reference,
    prediction)["rougeL"].fmeasure`."""
    return rouge_l_tokens(rouge_tokens(reference), rouge_tokens(prediction))


def exact_match(reference: str, prediction: str, normalization: str = "squad") -> bool:
    normalize = NORMALIZERS[normalization]
    return normalize(prediction) == normalize(reference)


def answer_contained(reference: str, prediction: str, normalization: str = "squad") -> bool:
    """The normalized reference occurs in the normalized prediction, at word boundaries."""
    normalize = NORMALIZERS[normalization]
    ref, pred = normalize(reference), normalize(prediction)
    return bool(ref) and f" {ref} " in f" {pred} "


def picked_option(options: Sequence[str], prediction: str, normalization: str = "squad") -> str | None:
    """The option a free-text prediction chose: the one it equals after normalization, else the
    only one it contains; None when it names none or several."""
    normalize = NORMALIZERS[normalization]
    pred = normalize(prediction)
    for option in options:
        if normalize(option) == pred:
            return option
    contained = [o for o in options if normalize(o) and f" {normalize(o)} " in f" {pred} "]
    return contained[0] if len(contained) == 1 else None
