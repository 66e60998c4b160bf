"""Preference records tokenized as SFT tokenizes a conversation, into pairs of adjacent samples.

Each side (the prompt followed by the chosen response, then by the rejected one) is rendered by the
run's template and encoded exactly as an SFT sample is (packtune.data.encoding: the model's own
ids, masks by characters); the prompt is rendered alone with the generation prompt (as
`apply_chat_template(..., add_generation_prompt=True)`) and encoded too. Its ids must begin both
sides' ids, token for token, so chosen and rejected share exactly the prompt's ids; a record where
they do not (a template or tokenizer that renders the prompt differently before an answer, a token
merged across the boundary) is a DataError naming the record, reason `prompt_not_prefix`.

A pair is stored as two adjacent samples of the TokenizedDataset (chosen at 2i, rejected at 2i+1),
each trained only on its response: the tokens SFT would train (`data.train_on`) that come after the
prompt. `prompt_lengths[i]` is the prompt's length in tokens. Caching, the data report and the
sampler are SFT's. A pair longer than `max_tokens` (both sides, the prompt counted twice, as the
unshared layout packs it) is dropped, or with `truncation = "truncate"` its longer response is cut
first until the pair fits.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from packtune.data import fidelity
from packtune.data.dataset import ChunkTokenizer
from packtune.data.formats import Conversation, decode_record, location
from packtune.data.record_errors import settle_errors
from packtune.errors import DataError
from packtune.preference.records import to_pair


class PairTokenizer(ChunkTokenizer):
    """Tokenizes chunks of preference records into (chosen, rejected) sample pairs."""

    def __call__(self, chunk: list[tuple[int, Any]]) -> dict[str, Any]:
        job = self.job
        errors: list[tuple[int, DataError]] = []
        pairs, wheres, numbers = [], [], []
        rendered = []
        for number, raw in chunk:
            where = location(job["path"], number, job["unit"])
            try:
                pair = to_pair(decode_record(where, raw), self.fields, where)
                sides = [self.format.render.prompt(Conversation(pair.prompt), where)]
                for side in ("chosen", "rejected"):
                    samples = self.format.render(pair.conversation(side), where)
                    if len(samples) != 1:
                        raise DataError(f"{where}: the {side} side renders as {len(samples)} samples "
                                        "(data.rewritten_history = \"split\"); a preference pair needs one",
                                        "rewritten_history")
                    sides += samples
            except DataError as e:
                errors.append((number, e))
                continue
            pairs.append(pair)
            rendered += sides
            wheres += [where] * 3
            numbers.append(number)
        encoded = self.format.encoder.encode_samples(rendered, wheres)
        checks = [(wheres[3 * k + 1], self.format.render.messages(pair.conversation("chosen")),
                   rendered[3 * k + 1], encoded[3 * k + 1].ids)
                  for k, pair in enumerate(pairs[: self.checks_left])
                  if not isinstance(encoded[3 * k + 1], DataError)]
        checked = fidelity.check_samples(self.tokenizer, job["tokenizer"], checks,
                                         self.format.encoder.find_controls)
        self.checks_left -= len(checks)
        out = _PairsOut()
        for k, number in enumerate(numbers):
            prompt, chosen, rejected = encoded[3 * k : 3 * k + 3]
            try:
                out.add(number, *_pair_ids(prompt, chosen, rejected, wheres[3 * k]), job)
            except DataError as e:
                errors.append((number, e))
        kept_errors = settle_errors(errors, job["skip_bad_records"], out.dropped)
        return {**out.arrays(), "dropped": out.dropped, "truncated": out.truncated,
                "straddling": out.straddling, "fidelity_checked": checked, "chat_format": self.describe(),
                "errors": kept_errors}


def _pair_ids(prompt, chosen, rejected, where: str):
    """(prompt length, chosen ids, chosen mask, rejected ids, rejected mask, straddling), the masks
    holding the response tokens SFT trains; the prompt's ids checked to begin both sides."""
    for result in (prompt, chosen, rejected):
        if isinstance(result, DataError):
            raise result
    n = len(prompt.ids)
    sides = []
    for side, sample in (("chosen", chosen), ("rejected", rejected)):
        if sample.ids[:n] != prompt.ids:
            at = next((i for i, (a, b) in enumerate(zip(sample.ids, prompt.ids, strict=False)) if a != b),
                      min(n, len(sample.ids)))
            raise DataError(f"{where}: the prompt's {n} tokens do not begin the {side} side's tokens (they "
                            f"part at token {at}): the template or tokenizer renders the prompt differently "
                            "before an answer", "prompt_not_prefix")
        mask = [m and i >= n for i, m in enumerate(sample.mask)]
        if not any(mask):
            raise DataError(f"{where}: the {side} response has no trained token", "no_label_tokens")
        sides += [sample.ids, mask]
    return n, *sides, chosen.straddling + rejected.straddling


class _PairsOut:
    """The kept pairs of a chunk, with the drop and truncation counts."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: list[bool] = []
        self.lengths: list[int] = []
        self.lines: list[int] = []
        self.prompt_lengths: list[int] = []
        self.dropped, self.truncated = Counter(), Counter()
        self.straddling = 0

    def add(self, number: int, n: int, chosen: list[int], chosen_mask: list[bool], rejected: list[int],
            rejected_mask: list[bool], straddling: int, job: dict[str, Any]) -> None:
        budget = job["max_tokens"] - 2 * n  # response tokens the pair may hold
        if len(chosen) + len(rejected) - 2 * n > budget:
            if job["truncation"] == "drop":
                self.dropped["too_long"] += 1
                return
            keep = _split_budget(len(chosen) - n, len(rejected) - n, budget)
            chosen, chosen_mask = chosen[: n + keep[0]], chosen_mask[: n + keep[0]]
            rejected, rejected_mask = rejected[: n + keep[1]], rejected_mask[: n + keep[1]]
            if not (any(chosen_mask) and any(rejected_mask)):
                self.dropped["no_label_tokens_after_truncation"] += 1
                return
            self.truncated["too_long"] += 1
        self.straddling += straddling > 0
        for ids, mask in ((chosen, chosen_mask), (rejected, rejected_mask)):
            self.ids += ids
            self.mask += mask
            self.lengths.append(len(ids))
            self.lines.append(number)
        self.prompt_lengths.append(n)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": np.array(self.ids, dtype=np.int32), "mask": np.array(self.mask, dtype=bool),
                "lengths": np.array(self.lengths, dtype=np.int64),
                "lines": np.array(self.lines, dtype=np.int64),
                "prompt_lengths": np.array(self.prompt_lengths, dtype=np.int64)}


def _split_budget(chosen: int, rejected: int, budget: int) -> tuple[int, int]:
    """Response lengths within `budget` tokens together: the longer response is cut first, until
    both are equal, then both alike (none below 0)."""
    budget = max(budget, 0)
    short, long = sorted((chosen, rejected))
    kept_short = min(short, budget // 2)
    kept_long = min(long, budget - kept_short)
    return (kept_long, kept_short) if chosen >= rejected else (kept_short, kept_long)

