"""Rows of (input, target) pairs for an encoder-decoder, packed as T5X packs them: each row holds
several pairs, the encoder's side at most `max_tokens` input tokens, the decoder's at most
`max_target_tokens` target tokens.

Packing is two-dimensional: a pair fits a row only if both its sides fit. `pack_pairs_2d` places
pairs one by one (largest first for `bfd`, in a seeded random order for `shuffle`) into the open row
whose room, after the pair, is smallest in the Euclidean norm of (input room / input budget, target
room / target budget): the norm-based greedy of vector bin packing, which prefers the row whose
remaining shape matches the pair's, so rows short of inputs take pairs long in inputs and short in
targets, and the other way round, and both sides fill. At most `open_rows` rows are open; opening
one more closes the fullest.

`max_target_tokens = 0` sizes the decoder's side from the data: the input budget times the data's
target-to-input token ratio (rounded up to a multiple of 8, at least the longest target), the budget
at which both sides can fill alike. Packing efficiency is reported for each side.
"""

from __future__ import annotations

import math

import numpy as np

from packtune.data.packing import PACKING_STRATEGIES, _check_weighting, _Rows, loss_weights, split_to_multiple
from packtune.data.pairs import pair_lengths
from packtune.errors import DataError
from packtune.model.t5_batch import T5Batch

OPEN_ROWS = {"bfd": 64, "shuffle": 16}
"""Rows open at once per strategy: more rows, denser packing, slower (shuffle mixes more with fewer)."""


def pack_pairs_2d(input_lengths: np.ndarray, target_lengths: np.ndarray, budgets: tuple[int, int],
                  order: np.ndarray, open_rows: int) -> np.ndarray:
    """The row of each pair, pairs placed in `order` (see the module docstring)."""
    scale = 1.0 / np.asarray(budgets, dtype=np.float64)
    room = np.empty((0, 2), dtype=np.int64)  # the open rows' room left: inputs, targets
    ids = np.empty(0, dtype=np.int64)
    row_of = np.empty(len(order), dtype=np.int64)
    opened = 0
    sizes = np.stack([input_lengths, target_lengths], axis=1).astype(np.int64)
    for i in order.tolist():
        size = sizes[i]
        left = room - size
        fits = (left >= 0).all(axis=1)
        if fits.any():
            norms = np.where(fits, ((left * scale) ** 2).sum(axis=1), np.inf)
            best = int(np.argmin(norms))
            room[best] = left[best]
            row_of[i] = ids[best]
            continue
        if len(ids) == open_rows:  # close the fullest open row
            keep = np.arange(len(ids)) != int(np.argmin((room * scale).sum(axis=1)))
            room, ids = room[keep], ids[keep]
        room = np.vstack([room, np.asarray(budgets, dtype=np.int64) - size])
        ids = np.append(ids, opened)
        row_of[i] = opened
        opened += 1
    return row_of


def target_budget(input_lengths: np.ndarray, target_lengths: np.ndarray, max_tokens: int) -> int:
    """The decoder side's budget at which both sides fill alike (see the module docstring)."""
    ratio = target_lengths.sum() / max(input_lengths.sum(), 1)
    return max(int(target_lengths.max()), 8 * math.ceil(max_tokens * ratio / 8))


class PairRows(_Rows):
    """Packed rows of pairs over a dataset of pairs (data/pairs.py); each collates into a `T5Batch`."""

    def __init__(self, dataset, row_of: np.ndarray, max_tokens: int, loss_weighting: str = "token", *,
                 max_target_tokens: int, decoder_start_token_id: int) -> None:
        super().__init__(dataset, row_of, max_tokens, loss_weighting)
        self.max_target_tokens, self.decoder_start_token_id = max_target_tokens, decoder_start_token_id
        self.input_lengths, self.target_lengths = pair_lengths(dataset)

    @classmethod
    def packed(cls, dataset, max_tokens: int, max_target_tokens: int, decoder_start_token_id: int,
               strategy: str = "bfd", seed: int = 0, loss_weighting: str = "token") -> PairRows:
        """`max_target_tokens` 0: from the data (`target_budget`)."""
        if strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing strategy must be one of {', '.join(PACKING_STRATEGIES)}, "
                             f"got {strategy!r}")
        _check_weighting(loss_weighting)
        inputs, targets = pair_lengths(dataset)
        budgets = (max_tokens, max_target_tokens or target_budget(inputs, targets, max_tokens))
        for side, lengths, budget, key in (("input", inputs, budgets[0], "max_tokens"),
                                           ("target", targets, budgets[1], "max_target_tokens")):
            if lengths.max() > budget:
                raise DataError(f"a pair's {side} of {lengths.max()} tokens does not fit rows of {budget}; "
                                f"prepare the data with this data.{key}", "too_long")
        if strategy == "shuffle":
            order = np.random.default_rng(seed).permutation(len(inputs))
        else:  # the largest first, by the larger of its two shares of a row
            order = np.argsort(-np.maximum(inputs / budgets[0], targets / budgets[1]), kind="stable")
        row_of = pack_pairs_2d(inputs, targets, budgets, order, OPEN_ROWS[strategy])
        return cls(dataset, row_of, max_tokens, loss_weighting, max_target_tokens=budgets[1],
                   decoder_start_token_id=decoder_start_token_id)

    @classmethod
    def one_per_row(cls, dataset, decoder_start_token_id: int, loss_weighting: str = "token") -> PairRows:
        """Every pair in a row of its own: the unpacked counterpart (`packtune check`)."""
        inputs, targets = pair_lengths(dataset)
        return cls(dataset, np.arange(len(dataset)), int(inputs.max()), loss_weighting,
                   max_target_tokens=int(targets.max()), decoder_start_token_id=decoder_start_token_id)

    def with_row_multiple(self, multiple: int) -> PairRows:
        row_of = split_to_multiple(self.row_of, self.dataset.lengths, multiple)
        if row_of is self.row_of:
            return self
        return type(self)(self.dataset, row_of, self.max_tokens, self.loss_weighting,
                          max_target_tokens=self.max_target_tokens,
                          decoder_start_token_id=self.decoder_start_token_id)

    def side_efficiency(self) -> tuple[float, float]:
        """Real tokens per row slot on the encoder's side and on the decoder's."""
        rows = len(self)
        return (float(self.input_lengths.sum() / (rows * self.max_tokens)),
                float(self.target_lengths.sum() / (rows * self.max_target_tokens)))

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots, both sides together."""
        return float(self.row_tokens.sum() / (len(self) * (self.max_tokens + self.max_target_tokens)))

    def collate(self, row: int) -> T5Batch:
        samples = self.samples(row)
        ins, outs = self.input_lengths[samples], self.target_lengths[samples]
        starts = self.dataset.offsets[samples]
        tokens = self.dataset.tokens
        inputs = np.concatenate([tokens[a : a + n] for a, n in zip(starts, ins, strict=True)])
        ends = zip(starts + ins, outs, strict=True)
        targets = np.concatenate([tokens[a : a + t] for a, t in ends]).astype(np.int64)
        weights, num_items = loss_weights(targets, outs, self.loss_weighting)
        return T5Batch.from_arrays(inputs, targets, ins, outs, self.decoder_start_token_id, num_items,
                                   weights)
