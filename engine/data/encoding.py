"""Rendered conversations to token ids and a loss mask, as the model's own tokenizer encodes them.

A template renders a conversation into one string (`Rendered`) and says which characters are
trained and which came from the record. The encoder finds the template's control tokens (the
tokenizer's special tokens, outside record text), cuts the string there, exactly where the tokenizer
itself would split it, and encodes the text between them in one batch with special-token matching
off. So the ids equal the tokenizer's encoding of the whole rendered string (what transformers'
`apply_chat_template` gives), except that a control-token string inside record text stays text:
data can never inject a stop or a turn marker.

The loss mask is placed by characters: a token is trained when any of its characters is trained
(as transformers' assistant masks do). A token that straddles the boundary between prompt and
answer (a merge across the boundary, e.g. "\\n\\n" in byte-level BPE) is never an error; such
tokens are counted (`straddling`) so the data report can say how many samples have one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from packtune.data.tokenizer import Tokenizer
from packtune.errors import DataError


@dataclass(frozen=True)
class Rendered:
    """One conversation rendered by a template."""

    text: str
    trained: tuple[tuple[int, int], ...]
    """[start, end) character spans the model learns to produce."""
    data: tuple[tuple[int, int], ...] = ()
    """Character spans of record text: never control tokens."""
    leading_bos: bool = False
    """A BOS id before the text, as a tokenizer adds it (the text still starts the sample)."""
    bos_trained: bool = False


class EncodedSample(NamedTuple):
    ids: list[int]
    mask: list[bool]
    """True where the token is one the model learns to produce."""
    straddling: int
    """Tokens holding both trained and untrained characters."""


class ChatEncoder:
    """Encodes `Rendered` samples with `tokenizer`; `extra_controls` are template strings to treat as
    control tokens when the vocabulary has them as one token (a template's `special_tokens`)."""

    def __init__(self, tokenizer: Tokenizer, extra_controls: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.controls = dict(tokenizer.controls)
        for text in extra_controls:
            i = tokenizer.token_id(text)
            if i is not None:
                self.controls.setdefault(text, i)
        ordered = sorted(self.controls, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def find_controls(self, text: str) -> list[tuple[int, int]]:
        """[start, end) of each control-token string in `text`."""
        return [m.span() for m in self.pattern.finditer(text)] if self.pattern else []

    def encode_samples(
        self, samples: Sequence[Rendered], wheres: Sequence[str]
    ) -> list[EncodedSample | DataError]:
        """Per sample its ids and mask, or the DataError saying why it cannot be encoded exactly."""
        plans, jobs = [], {True: [], False: []}
        for sample in samples:
            plan = []
            for start, end, cid in self._pieces(sample):
                if cid is not None:
                    plan.append((start, end, cid))
                else:
                    first = start == 0
                    jobs[first].append(sample.text[start:end])
                    plan.append((start, end, (first, len(jobs[first]) - 1)))
            plans.append(plan)
        encoded = {
            first: self.tok.encode_chunks(texts, first) if texts else [] for first, texts in jobs.items()
        }
        return [
            self._assemble(sample, plan, encoded, where)
            for sample, plan, where in zip(samples, plans, wheres, strict=True)
        ]

    def _pieces(self, sample: Rendered) -> list[tuple[int, int, int | None]]:
        """(start, end, control id) for each control token, (start, end, None) for text between."""
        pieces, pos = [], 0
        for m in self.pattern.finditer(sample.text) if self.pattern else ():
            if any(lo < m.end() and m.start() < hi for lo, hi in sample.data):
                continue  # the string is record text
            if m.start() > pos:
                pieces.append((pos, m.start(), None))
            pieces.append((m.start(), m.end(), self.controls[m.group()]))
            pos = m.end()
        if pos < len(sample.text):
            pieces.append((pos, len(sample.text), None))
        return pieces

    def _assemble(self, sample: Rendered, plan: list, encoded: dict, where: str) -> EncodedSample | DataError:
        ids: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        for start, end, item in plan:
            if isinstance(item, int):
                ids.append(item)
                starts.append(start)
                ends.append(end)
                continue
            chunk_ids, spans = encoded[item[0]][item[1]]
            if spans is None:
                chunk = sample.text[start:end]
                decoded = self.tok.decode_batch([chunk_ids])[0]
                at = next(
                    (k for k, (a, b) in enumerate(zip(chunk, decoded, strict=False)) if a != b),
                    min(len(chunk), len(decoded)),
                )
                return self._error(
                    where, chunk, at, f"the tokenizer's normalizer rewrites it (at character {at})"
                )
            if self.tok.unk_id is not None and self.tok.unk_id in chunk_ids:
                at = spans[chunk_ids.index(self.tok.unk_id)][0]
                why = "it has a character the vocabulary lacks"
                return self._error(where, sample.text[start:end], at, why)
            ids += chunk_ids
            starts += [start + s for s, _ in spans]
            ends += [start + e for _, e in spans]
        mask, straddling = _trained(sample, np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))
        if sample.leading_bos:
            ids.insert(0, self.tok.bos_id)
            mask.insert(0, sample.bos_trained)
        return EncodedSample(ids, mask, straddling)

    def _error(self, where: str, chunk: str, at: int, why: str) -> DataError:
        return DataError(
            f"{where}: the text {chunk[max(0, at - 20) : at + 20]!r} cannot be encoded exactly by "
            f"tokenizer {self.tok.path.name}: {why}; fix the record or set data.skip_bad_records = true",
            "tokenization_mismatch",
        )


def _trained(sample: Rendered, starts: np.ndarray, ends: np.ndarray) -> tuple[list[bool], int]:
    """Per token: does it hold a trained character (an empty span: is its position trained)."""
    chars = np.zeros(len(sample.text) + 1, dtype=np.int64)
    for lo, hi in sample.trained:
        chars[lo:hi] = 1
    before = np.concatenate([[0], np.cumsum(chars)])
    inside = before[ends] - before[starts]
    mask = np.where(ends > starts, inside > 0, chars[starts] > 0)
    straddling = int(((inside > 0) & (inside < ends - starts)).sum())
    return mask.tolist(), straddling
