"""Best-fit decreasing packing of the whole dataset, and the batches the training loop consumes.

`best_fit_decreasing(lengths, capacity)` assigns every sample to a row: samples in descending
length order, each into the open row with the least room that still fits it. The C++ op
`packtune.bfd_pack` (csrc/bfd_pack.cpp) does this in a few ms per million samples; the Python
version below is the same algorithm (its reference, and the fallback without the extension). It
places a run of equal lengths into one row at a time: after an item goes into the best-fitting
row, that row is still the best fit for the next item of the same length as long as it has room,
so the result is identical to placing items one by one.

A `PackedBatch` is one row: samples concatenated without padding, labels shifted *per sample*
(`shift_labels`: the label at t is token t+1 of the same sample, -100 on prompt tokens and on
each sample's last position) and the row's `PackedLayout` (packtune.kernels.packed_layout:
sample offsets, positions, label rows and their count, all built here on the host, so the step
needs no device-to-host sync). `PaddedBatch` is the padded counterpart (pad-to-longest), for
comparison.

Both carry the loss weighting (`[train] loss_weighting`, see `loss_weights`): per-token weights
(None for "token") and `num_items`, the batch's share of the step's loss normalizer (label tokens,
samples or turns), both computed here on the host, once, from the shifted labels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from packtune.config.train import LOSS_WEIGHTINGS
from packtune.errors import DataError
from packtune.kernels.packed_layout import IGNORE_INDEX, PackedLayout, shift_labels


def _extension_available() -> bool:
    try:
        import packtune._C  # noqa: F401  (registers torch.ops.packtune.bfd_pack)
    except ImportError:
        return False
    return hasattr(torch.ops.packtune, "bfd_pack")


def _checked_lengths(lengths: np.ndarray, capacity: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"lengths must lie in [1, {capacity}], got [{lengths.min()}, {lengths.max()}]")
    return lengths


def best_fit_decreasing(lengths: np.ndarray, capacity: int, *, backend: str | None = None) -> np.ndarray:
    """The row of each sample (rows numbered in the order they were opened)."""
    lengths = _checked_lengths(lengths, capacity)
    # Descending, ties by index: a stable ascending sort of (capacity - length); 16-bit keys when
    # they fit, where numpy sorts by radix.
    keys = capacity - lengths
    order = np.argsort(keys.astype(np.uint16) if capacity < 2**16 else keys, kind="stable")
    sorted_lengths = lengths[order]
    backend = backend or ("cpp" if _extension_available() else "python")
    if backend == "cpp":
        rows_sorted = torch.ops.packtune.bfd_pack(torch.from_numpy(sorted_lengths), capacity).numpy()
    elif backend == "python":
        rows_sorted = _bfd_sorted_python(sorted_lengths, capacity)
    else:
        raise ValueError(f"backend must be 'cpp' or 'python', got {backend!r}")
    row_of = np.empty(len(lengths), dtype=np.int64)
    row_of[order] = rows_sorted
    return row_of


def _bfd_sorted_python(sorted_lengths: np.ndarray, capacity: int) -> np.ndarray:
    row_of = np.empty(len(sorted_lengths), dtype=np.int64)
    stacks: dict[int, list[int]] = {}  # remaining room -> rows with that room (last pushed = chosen)
    nonempty = 0  # bit r set when stacks[r] is non-empty
    n_rows = 0
    starts = np.flatnonzero(np.r_[True, sorted_lengths[1:] != sorted_lengths[:-1]])
    ends = np.r_[starts[1:], len(sorted_lengths)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=False):
        need, pos = int(sorted_lengths[start]), start
        while pos < end:
            above = nonempty >> need
            if above:
                room = need + (above & -above).bit_length() - 1
                stack = stacks[room]
                row = stack.pop()
                if not stack:
                    nonempty &= ~(1 << room)
                take = min(room // need, end - pos)
                row_of[pos : pos + take] = row
                pos += take
                rooms = [(room - take * need, row)]
            else:  # no open row fits: open rows, each filled with as many items as fit
                per_row, count = capacity // need, end - pos
                n_new = -(-count // per_row)
                row_of[pos:end] = n_rows + np.arange(count) // per_row
                last = count - (n_new - 1) * per_row
                rooms = [(capacity - per_row * need, n_rows + i) for i in range(n_new - 1)]
                rooms.append((capacity - last * need, n_rows + n_new - 1))
                n_rows += n_new
                pos = end
            for room, row in rooms:
                if room > 0:
                    stacks.setdefault(room, []).append(row)
                    nonempty |= 1 << room
    return row_of


def shuffled_best_fit(lengths: np.ndarray, capacity: int, seed: int = 0, open_rows: int = 16) -> np.ndarray:
    """The row of each sample when samples, in a seeded random order, each go to the fullest of at
    most `open_rows` open rows that has room (a new row when none has; the fullest open row is
    closed when there are too many). The random order mixes lengths in every row; the few open
    rows keep them nearly as dense as best-fit decreasing."""
    lengths = _checked_lengths(lengths, capacity)
    order = np.random.default_rng(seed).permutation(len(lengths))
    row_of = np.empty(len(lengths), dtype=np.int64)
    rows: list[list[int]] = []  # [room left, row id] of each open row
    opened = 0
    for i, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
        fits = [r for r in rows if r[0] >= n]
        if fits:
            best = min(fits)
        else:
            if len(rows) == open_rows:
                rows.remove(min(rows))
            best = [capacity, opened]
            opened += 1
            rows.append(best)
        best[0] -= n
        row_of[i] = best[1]
    return row_of


def rows_from_assignment(row_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices grouped by row, row offsets) from the row of each sample."""
    order = np.argsort(row_of, kind="stable")
    counts = np.bincount(row_of, minlength=int(row_of.max()) + 1 if len(row_of) else 0)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return order, offsets


def split_to_multiple(row_of: np.ndarray, lengths: np.ndarray, multiple: int) -> np.ndarray:
    """Split rows until their number is a multiple of `multiple`: each split moves the shortest
    sample of the row holding the most samples into a new row. Every sample stays in exactly one
    row, so every rank gets the same number of micro-batches without dropping or repeating any."""
    n_rows = int(row_of.max()) + 1
    extra = -n_rows % multiple
    if extra == 0:
        return row_of
    if len(row_of) < n_rows + extra:
        raise DataError(
            f"{len(row_of)} samples cannot fill a multiple of {multiple} rows (world size x "
            "micro-batches); use fewer ranks or micro-batches, or more data",
            "too_few_samples",
        )
    row_of = row_of.copy()
    counts = np.bincount(row_of, minlength=n_rows)
    for new_row in range(n_rows, n_rows + extra):
        row = int(np.argmax(counts))
        members = np.flatnonzero(row_of == row)
        moved = members[np.argmin(lengths[members])]
        row_of[moved] = new_row
        counts[row] -= 1
        counts = np.append(counts, 1)
    return row_of


@dataclass
class Batch:
    """A micro-batch: token ids, unshifted labels, the layout every op reads, and its loss items."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    layout: PackedLayout
    num_items: int
    """This row's share of the loss normalizer: label tokens, samples or turns (see loss_weights)."""
    loss_weights: torch.Tensor | None
    """fp32 per-token loss weights, None for token weighting."""

    @property
    def num_label_tokens(self) -> int:
        return self.layout.num_label_rows

    @property
    def num_tokens(self) -> int:
        """Token slots of the batch (a padded batch's padding included)."""
        return self.input_ids.numel()

    def normalizers(self) -> tuple[int, ...]:
        """The step's loss normalizers this batch adds to (summed over the step's batches and ranks,
        passed to the loss as `num_items`): its loss items."""
        return (self.num_items,)

    def loss_inputs(self) -> dict:
        """What the loss reads besides ids, labels, layout and weights (none here)."""
        return {}

    def flops(self, args) -> float:
        """Training FLOPs of the batch: the family's count per token (`ModelArgs.num_flops_per_token`) at
        the length its tokens attend over, times its tokens."""
        return args.num_flops_per_token(self.layout.attended_length) * self.num_tokens

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return type(self)(
            **{f.name: _move(getattr(self, f.name), device, non_blocking) for f in fields(self)}
        )


class PackedBatch(Batch):
    """One packed row: `T` real tokens of several samples, no padding."""


class PaddedBatch(Batch):
    """`B` samples right-padded to the longest (`[B, L]` tensors); `labels` are -100 on padding."""


def _move(value, device, non_blocking):
    """A field copied to `device`; host -> CUDA tensor copies go through pinned memory, without which
    `non_blocking=True` is a synchronous copy from pageable memory (PackedLayout.to pins its own)."""
    if isinstance(value, PackedLayout):
        return value.to(device, non_blocking=non_blocking)
    if not isinstance(value, torch.Tensor):
        return value
    if non_blocking and value.device.type == "cpu" and torch.device(device).type == "cuda":
        value = value.pin_memory()
    return value.to(device, non_blocking=non_blocking)


def _check_weighting(weighting: str) -> None:
    """The library-level guard (the run's config is checked before, in packtune.config)."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {weighting!r}")


def loss_weights(labels: np.ndarray, seq_lens: np.ndarray, weighting: str) -> tuple[np.ndarray | None, int]:
    """(per-token weights, the normalizer's count) for concatenated samples' shifted labels.

    token: no weights (None), count = label tokens. sample: 1 / (label tokens of the token's
    sample), count = samples with a label token. turn: 1 / (tokens of the token's turn), a turn
    being a maximal run of label tokens within a sample, count = turns. Non-label tokens get 0.
    Summed over a step's batches and ranks, the count divides the summed weighted token losses.
    """
    _check_weighting(weighting)
    is_label = labels != IGNORE_INDEX
    if weighting == "token":
        return None, int(is_label.sum())
    if weighting == "sample":
        group = np.repeat(np.arange(len(seq_lens)), seq_lens)[is_label]
    else:
        after_label = np.r_[False, is_label[:-1]]
        after_label[np.cumsum(seq_lens)[:-1]] = False  # a turn never continues into the next sample
        group = np.cumsum(is_label & ~after_label)[is_label] - 1
    sizes = np.bincount(group)
    weights = np.zeros(len(labels), dtype=np.float32)
    weights[is_label] = 1.0 / sizes[group]
    return weights, int((sizes > 0).sum())


class _Rows:
    """Rows of sample indices over a TokenizedDataset; subclasses collate a row into a batch whose
    loss weights follow `loss_weighting` (one of LOSS_WEIGHTINGS)."""

    def __init__(self, dataset, row_of: np.ndarray, max_tokens: int, loss_weighting: str = "token") -> None:
        _check_weighting(loss_weighting)
        self.dataset, self.row_of, self.max_tokens = dataset, row_of, max_tokens
        self.loss_weighting = loss_weighting
        self.order, self.offsets = rows_from_assignment(row_of)
        self.row_tokens = np.bincount(row_of, weights=dataset.lengths, minlength=len(self)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def samples(self, row: int) -> np.ndarray:
        return self.order[self.offsets[row] : self.offsets[row + 1]]

    def with_row_multiple(self, multiple: int):
        """The same rows, split so that their number is a multiple of `multiple`."""
        row_of = split_to_multiple(self.row_of, self.dataset.lengths, multiple)
        if row_of is self.row_of:
            return self
        return type(self)(self.dataset, row_of, self.max_tokens, self.loss_weighting)

    def _gather(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        samples = self.samples(row)
        starts, ends = self.dataset.offsets[samples], self.dataset.offsets[samples + 1]
        ids = np.concatenate([self.dataset.tokens[a:b] for a, b in zip(starts, ends, strict=False)]).astype(
            np.int64
        )
        mask = np.concatenate([self.dataset.mask[a:b] for a, b in zip(starts, ends, strict=False)])
        return ids, mask, (ends - starts)


PACKING_STRATEGIES = ("bfd", "shuffle")


class PackedRows(_Rows):
    """Rows of at most `max_tokens` tokens: best-fit decreasing, or best fit in a shuffled order."""

    @classmethod
    def packed(cls, dataset, max_tokens: int, strategy: str = "bfd", seed: int = 0,
               loss_weighting: str = "token") -> PackedRows:
        """`strategy` is one of PACKING_STRATEGIES (see DataConfig.packing_strategy)."""
        if strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing strategy must be one of {', '.join(PACKING_STRATEGIES)}, "
                             f"got {strategy!r}")
        lengths = dataset.lengths
        if lengths.max() > max_tokens:
            raise DataError(
                f"a sample of {lengths.max()} tokens does not fit rows of {max_tokens}; prepare "
                "the data with this max_tokens",
                "too_long",
            )
        if strategy == "shuffle":
            return cls(dataset, shuffled_best_fit(lengths, max_tokens, seed), max_tokens, loss_weighting)
        return cls(dataset, best_fit_decreasing(lengths, max_tokens), max_tokens, loss_weighting)

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots."""
        return float(self.row_tokens.sum() / (len(self) * self.max_tokens))

    def collate(self, row: int) -> PackedBatch:
        ids, mask, seq_lens = self._gather(row)
        return build_packed_batch(ids, ids, mask, seq_lens, self.loss_weighting)


def build_packed_batch(ids: np.ndarray, targets: np.ndarray, trainable: np.ndarray,
                       seq_lens: np.ndarray, loss_weighting: str = "token") -> PackedBatch:
    """One packed row from its samples' concatenated input ids, target ids (usually the inputs
    themselves), trainable mask and lengths: labels shifted per sample, the row's PackedLayout and
    loss weights, all computed on the host."""
    labels = shift_labels(np.where(trainable, targets, IGNORE_INDEX), np.cumsum(seq_lens) - 1)
    weights, num_items = loss_weights(labels, seq_lens, loss_weighting)
    return PackedBatch(
        torch.from_numpy(ids),
        torch.from_numpy(labels),
        PackedLayout.packed(seq_lens, labels),
        num_items,
        None if weights is None else torch.from_numpy(weights),
    )


class PaddedRows(_Rows):
    """Micro-batches of `batch_size` samples in a seeded random grouping, padded to the longest."""

    pad_id = 0

    @classmethod
    def random_groups(cls, dataset, batch_size: int, seed: int = 0,
                      loss_weighting: str = "token") -> PaddedRows:
        perm = np.random.default_rng(seed).permutation(len(dataset))
        row_of = np.empty(len(dataset), dtype=np.int64)
        row_of[perm] = np.arange(len(dataset)) // batch_size
        return cls(dataset, row_of, dataset.max_tokens, loss_weighting)

    @property
    def efficiency(self) -> float:
        """Real tokens / padded slots (each micro-batch padded to its longest sample)."""
        lengths = self.dataset.lengths
        longest = np.zeros(len(self), dtype=np.int64)
        np.maximum.at(longest, self.row_of, lengths)
        counts = np.diff(self.offsets)
        return float(self.row_tokens.sum() / (longest * counts).sum())

    def collate(self, row: int) -> PaddedBatch:
        ids, mask, seq_lens = self._gather(row)
        labels = shift_labels(np.where(mask, ids, IGNORE_INDEX), np.cumsum(seq_lens) - 1)
        weights, num_items = loss_weights(labels, seq_lens, self.loss_weighting)
        batch, width = len(seq_lens), int(seq_lens.max())
        valid = np.arange(width)[None, :] < seq_lens[:, None]
        input_ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        padded_labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
        input_ids[valid], padded_labels[valid] = ids, labels
        padded_weights = None
        if weights is not None:
            padded_weights = np.zeros((batch, width), dtype=np.float32)
            padded_weights[valid] = weights
        return PaddedBatch(
            torch.from_numpy(input_ids),
            torch.from_numpy(padded_labels),
            PackedLayout.padded(seq_lens, padded_labels),
            num_items,
            None if padded_weights is None else torch.from_numpy(padded_weights),
        )
