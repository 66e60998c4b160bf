"""Preference pairs in rows: a pair's chosen and rejected sides always in the same row, padding-free,
no token attending across samples; and the batch the preference loss reads.

A pair's unit in a packed row, unshared (`[preference] shared_prompt = false`): the chosen sample
(prompt + chosen response) then the rejected one, two samples of the row's PackedLayout, so
sample 2j of the row is pair j's chosen side and 2j + 1 its rejected side.

Shared (prefix sharing, the default): the prompt once. Its last token's hidden state predicts each
response's first token, under two different labels, so that token is packed once per side:

    [prompt[:-1]] [prompt[-1], chosen response] [prompt[-1], rejected response]
     ---------- query segment 2j ------------   --- query segment 2j + 1 ---

Segment 2j is the chosen sample as it stands alone (causal over its own tokens); segment 2j + 1
attends to the keys of prompt[:-1] and then its own (`GatheredKeys`, bottom-right causal), its
positions continuing after the prompt: exactly the rejected sample's attention, without its
prompt[:-1]. Labels are each side's own shifted labels. So the loss reads both layouts alike:
segment 2j chosen, 2j + 1 rejected, and a pair saves prompt - 1 tokens when shared.

Rows: best-fit decreasing (or the shuffled best fit) over the pairs' units, as SFT packs samples;
`PaddedPairRows` pads pairs instead (the chosen and rejected rows of B pairs, `[2B, L]`), for
comparison. Both give `PreferenceBatch`es: a `Batch` whose loss items are its pairs, which also
carries its chosen label tokens (the NLL terms' normalizer) and the pairs' reference log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from packtune.data.packing import (
    PACKING_STRATEGIES,
    Batch,
    best_fit_decreasing,
    shuffled_best_fit,
    split_to_multiple,
)
from packtune.errors import DataError
from packtune.kernels.packed_layout import IGNORE_INDEX, GatheredKeys, PackedLayout, shift_labels


@dataclass
class PreferenceBatch(Batch):
    """Pairs' tokens (segment 2j: pair j's chosen side, 2j + 1: its rejected side); `num_items`
    counts the pairs."""

    chosen_tokens: int = 0
    """Label tokens of the chosen responses: the normalizer of the NLL terms (ORPO, sft_weight)."""
    ref_logps: torch.Tensor | None = None
    """fp32 `[pairs, 2]` reference log-probs (chosen, rejected) of the batch's pairs; None where the
    objective needs none or they are being computed."""
    pairs: np.ndarray | None = None
    """Each pair's index among the rows' pairs (stays on the host)."""

    def normalizers(self) -> tuple[int, ...]:
        """The loss's normalizers, summed over the step: pairs, then chosen label tokens."""
        return (self.num_items, self.chosen_tokens)

    def loss_inputs(self) -> dict:
        return {"ref_logps": self.ref_logps}


class _PairRows:
    """Rows of pairs over a preference TokenizedDataset (samples 2i, 2i + 1 and prompt_lengths[i]).

    `pair_index[i]`: pair i's index in the dataset the reference log-probs were computed for (the
    whole data, when this is a split); `ref_logps` `[n, 2]`, set once they are known, are in that
    order too."""

    def __init__(self, dataset, row_of: np.ndarray, max_tokens: int, shared: bool,
                 pair_index: np.ndarray | None = None) -> None:
        if dataset.prompt_lengths is None:
            raise DataError("preference rows need preference records (chosen / rejected); the data has none",
                            "config")
        self.dataset, self.row_of, self.max_tokens, self.shared = dataset, row_of, max_tokens, shared
        n = len(dataset.prompt_lengths)
        self.pair_index = np.arange(n) if pair_index is None else pair_index
        self.ref_logps: np.ndarray | None = None
        self.order = np.argsort(row_of, kind="stable")
        counts = np.bincount(row_of, minlength=int(row_of.max()) + 1 if n else 0)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.row_tokens = np.bincount(row_of, weights=self.units, minlength=len(self)).astype(np.int64)

    @property
    def units(self) -> np.ndarray:
        """Each pair's tokens in a row (see the module docstring)."""
        return pair_units(self.dataset, self.shared)

    @property
    def shared_tokens_saved(self) -> int:
        """Tokens prefix sharing leaves out, over all pairs (0 when unshared)."""
        return int(pair_units(self.dataset, False).sum() - self.units.sum())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pairs(self, row: int) -> np.ndarray:
        return self.order[self.offsets[row] : self.offsets[row + 1]]

    def with_row_multiple(self, multiple: int):
        """The same rows, split so that their number is a multiple of `multiple` (a pair stays whole)."""
        row_of = split_to_multiple(self.row_of, self.units, multiple)
        if row_of is self.row_of:
            return self
        rows = type(self)(self.dataset, row_of, self.max_tokens, self.shared, self.pair_index)
        rows.ref_logps = self.ref_logps
        return rows

    def _sides(self, pair: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(prompt length, chosen ids, chosen labels, rejected ids, rejected labels), labels shifted."""
        out = [int(self.dataset.prompt_lengths[pair])]
        for sample in (2 * pair, 2 * pair + 1):
            ids, mask = self.dataset.sample(sample)
            ids = ids.astype(np.int64)
            out += [ids, shift_labels(np.where(mask, ids, IGNORE_INDEX), [len(ids) - 1])]
        return tuple(out)

    def _extras(self, pairs: np.ndarray, labels: list[np.ndarray]) -> dict:
        chosen = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels[0::2])
        ref = None
        if self.ref_logps is not None:
            ref = torch.from_numpy(self.ref_logps[self.pair_index[pairs]].astype(np.float32))
        return {"num_items": len(pairs), "loss_weights": None, "chosen_tokens": chosen, "ref_logps": ref,
                "pairs": pairs}


def pair_units(dataset, shared: bool) -> np.ndarray:
    """Each pair's tokens in a packed row: both samples, less prompt - 1 when the prompt is shared."""
    lengths = dataset.lengths
    units = lengths[0::2] + lengths[1::2]
    return units - np.maximum(dataset.prompt_lengths - 1, 0) if shared else units


class PackedPairRows(_PairRows):
    """Packed rows of at most `max_tokens` tokens, each pair whole in one row."""

    @classmethod
    def packed(cls, dataset, max_tokens: int, shared: bool, strategy: str = "bfd", seed: int = 0,
               pair_index: np.ndarray | None = None) -> PackedPairRows:
        if strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing strategy must be one of {', '.join(PACKING_STRATEGIES)}, "
                             f"got {strategy!r}")
        units = pair_units(dataset, shared)
        if units.max() > max_tokens:
            raise DataError(f"a preference pair of {units.max()} tokens does not fit rows of {max_tokens}; "
                            "prepare the data with this max_tokens", "too_long")
        row_of = (shuffled_best_fit(units, max_tokens, seed) if strategy == "shuffle"
                  else best_fit_decreasing(units, max_tokens))
        return cls(dataset, row_of, max_tokens, shared, pair_index)

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots."""
        return float(self.row_tokens.sum() / (len(self) * self.max_tokens))

    def collate(self, row: int) -> PreferenceBatch:
        pairs = self.pairs(row)
        sides = [self._sides(int(p)) for p in pairs]
        labels = [lab for s in sides for lab in (s[2], s[4])]
        if not self.shared:
            ids = np.concatenate([x for s in sides for x in (s[1], s[3])])
            flat = np.concatenate(labels)
            seq_lens = np.array([len(x) for s in sides for x in (s[1], s[3])])
            return PreferenceBatch(torch.from_numpy(ids), torch.from_numpy(flat),
                                   PackedLayout.packed(seq_lens, flat), **self._extras(pairs, labels))
        return shared_prefix_batch(sides, self._extras(pairs, labels))


def shared_prefix_batch(sides: list[tuple], extras: dict) -> PreferenceBatch:
    """One packed row of pairs with their prompts shared (the module docstring's layout), from each
    pair's (prompt length, chosen ids, chosen labels, rejected ids, rejected labels)."""
    ids, labels, positions, q_lens, key_index, k_lens = [], [], [], [], [], []
    start = 0
    for n, c_ids, c_labels, r_ids, r_labels in sides:
        s = max(n - 1, 0)  # the prefix both sides attend to
        c, r = len(c_ids), len(r_ids)
        ids += [c_ids, r_ids[s:]]
        labels += [c_labels, r_labels[s:]]
        positions += [np.arange(c), np.arange(s, r)]
        q_lens += [c, r - s]
        key_index += [np.arange(start, start + c), np.arange(start, start + s),
                      np.arange(start + c, start + c + r - s)]
        k_lens += [c, r]
        start += c + r - s
    q_lens, k_lens = np.array(q_lens), np.array(k_lens)
    flat = np.concatenate(labels)
    cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=cu[1:])
    cu_k = np.zeros(len(k_lens) + 1, dtype=np.int32)
    np.cumsum(k_lens, out=cu_k[1:])
    rows = torch.from_numpy(np.flatnonzero(flat != IGNORE_INDEX).astype(np.int64))
    key_index = np.concatenate(key_index).astype(np.int64)
    multiplicity = np.bincount(key_index, minlength=start).astype(np.float32)  # a shared prompt's: 2
    keys = GatheredKeys(torch.from_numpy(key_index), torch.from_numpy(cu_k), int(k_lens.max()),
                        torch.from_numpy(multiplicity))
    attended = float((q_lens * k_lens).sum() / q_lens.sum())  # keys per query, for the FLOPs count
    positions = torch.from_numpy(np.concatenate(positions))
    layout = PackedLayout(torch.from_numpy(cu), int(k_lens.max()), positions, rows, len(rows), attended, keys)
    return PreferenceBatch(torch.from_numpy(np.concatenate(ids)), torch.from_numpy(flat), layout, **extras)


class PaddedPairRows(_PairRows):
    """Micro-batches of `batch_size` pairs in a seeded random grouping: each pair's chosen and
    rejected sides as rows 2j and 2j + 1 of a `[2B, L]` batch padded to the longest."""

    pad_id = 0

    @classmethod
    def random_groups(cls, dataset, batch_size: int, seed: int = 0,
                      pair_index: np.ndarray | None = None) -> PaddedPairRows:
        n = len(dataset.prompt_lengths)
        perm = np.random.default_rng(seed).permutation(n)
        row_of = np.empty(n, dtype=np.int64)
        row_of[perm] = np.arange(n) // batch_size
        return cls(dataset, row_of, dataset.max_tokens, False, pair_index)

    @property
    def efficiency(self) -> float:
        """Real tokens / padded slots (each micro-batch padded to its longest side)."""
        lengths = self.dataset.lengths
        longest = np.zeros(len(self), dtype=np.int64)
        np.maximum.at(longest, self.row_of, np.maximum(lengths[0::2], lengths[1::2]))
        return float(self.row_tokens.sum() / (2 * longest * np.diff(self.offsets)).sum())

    def collate(self, row: int) -> PreferenceBatch:
        pairs = self.pairs(row)
        sides = [self._sides(int(p)) for p in pairs]
        ids = [x for s in sides for x in (s[1], s[3])]
        labels = [x for s in sides for x in (s[2], s[4])]
        seq_lens = np.array([len(x) for x in ids])
        width = int(seq_lens.max())
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        padded = np.full((len(ids), width), IGNORE_INDEX, dtype=np.int64)
        for i, (x, lab) in enumerate(zip(ids, labels, strict=True)):
            input_ids[i, : len(x)], padded[i, : len(x)] = x, lab
        return PreferenceBatch(torch.from_numpy(input_ids), torch.from_numpy(padded),
                               PackedLayout.padded(seq_lens, padded), **self._extras(pairs, labels))
