"""Which generated instructions Self-Instruct keeps: its heuristic filters, then ROUGE-L below 0.7
against every instruction kept so far (seed tasks included)."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

from packtune.datatools.answer_metrics import rouge_l_tokens, rouge_tokens

MIN_WORDS, MAX_WORDS = 3, 150
SIMILARITY = 0.7
UNACTIONABLE = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
"""Words asking for what a text model cannot see or produce (Alpaca's list)."""
_UNACTIONABLE = re.compile(r"\b(" + "|".join(re.escape(w) for w in UNACTIONABLE) + r")\b", re.IGNORECASE)


def heuristic_reason(instruction: str) -> str | None:
    """Why a heuristic rejects `instruction`, or None."""
    words = instruction.split()
    if len(words) < MIN_WORDS:
        return "too_short"
    if len(words) > MAX_WORDS:
        return "too_long"
    if _UNACTIONABLE.search(instruction):
        return "unactionable_word"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not (instruction[0].isascii() and instruction[0].isalnum()):
        return "starts_with_non_text"
    return None


class SimilarityIndex:
    """Kept instructions, tokenized once, for the maximum ROUGE-L of a candidate against them."""

    def __init__(self, instructions: Iterable[str] = ()) -> None:
        self.tokens: list[list[str]] = []
        self.texts: set[str] = set()
        for text in instructions:
            self.add(text)

    def add(self, instruction: str) -> None:
        self.tokens.append(rouge_tokens(instruction))
        self.texts.add(instruction)

    def max_similarity(self, instruction: str) -> float:
        if instruction in self.texts:
            return 1.0
        candidate = rouge_tokens(instruction)
        return max((rouge_l_tokens(kept, candidate) for kept in self.tokens), default=0.0)


def rejection(instruction: str, index: SimilarityIndex) -> str | None:
    """Why `instruction` is dropped (a heuristic, or `similar` to a kept one), or None to keep it."""
    reason = heuristic_reason(instruction)
    if reason is None and index.max_similarity(instruction) >= SIMILARITY:
        reason = "similar"
    return reason
