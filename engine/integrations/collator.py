"""PackedCollator: packtune's packed batches for any trainer (HF Trainer `data_collator=`, a DataLoader).

A call concatenates the samples it is given into one packed row, without padding. Each sample
is a dict with `input_ids` and one of: `labels` (Hugging Face style, unshifted: the token itself
where it is trained, -100 elsewhere), a 0/1 `loss_mask` (also accepted under TRL's names
`completion_mask` / `assistant_masks`), `prompt_ids` + `completion_ids` (or `response_ids`)
instead of `input_ids` (the completion is trained), or `input_ids` alone (every token trained).
An item may also be a list of such samples (one pre-packed row from `pack_samples`).

The batch (one row, leading dimension 1 for transformers models):

    input_ids     [1, T]  the samples back to back
    labels        [1, T]  UNshifted, Hugging Face's convention: the token at t where it is trained,
                          -100 elsewhere and on every sample's first token. A transformers model
                          shifts labels inside its loss (position t predicts labels[t + 1]), and the
                          -100 on each first token keeps the last position of one sample from
                          predicting the next sample's first token.
    shift_labels  [1, T]  already shifted per sample, packtune's convention (`shift_labels`, =
                          PackedBatch.labels): the label at t is token t + 1 of the same sample,
                          -100 on untrained tokens and each sample's last position. Equal to labels
                          shifted by one; when present, transformers' causal LM loss and the
                          Trainer's `num_items_in_batch` count use it as is, and so does the
                          patched model. For packtune's own loss use these.
    packed_layout         the row's PackedLayout (host tensors): positions, sample offsets, label
                          rows and their count, what the patched model and packtune's kernels read
    position_ids  [1, T]  = packed_layout.positions, for transformers' own packing detection
    cu_seqlens    [n+1]   = packed_layout.cu_seqlens; `max_seqlen` the longest sample (host int)
    num_label_tokens      host int: trained tokens in the batch (the loss denominator for one
                          micro-batch; sum it over micro-batches and ranks for a step)

A transformers model without `apply_packtune` also trains correctly on these batches: with no
attention_mask it detects the packing from `position_ids` (train with `use_cache=False`, as the
Trainer does: with a cache transformers ignores the packing) and ignores the extra keys.
With HF Trainer pass `remove_unused_columns=False`, or it drops sample keys the model's forward
does not name (`loss_mask`, `prompt_ids`, ...) before the collator sees them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from packtune.data.packing import PackedBatch, best_fit_decreasing, build_packed_batch, rows_from_assignment
from packtune.kernels.packed_layout import IGNORE_INDEX

_MASK_KEYS = ("loss_mask", "completion_mask", "assistant_masks")
_RESPONSE_KEYS = ("completion_ids", "response_ids")


def _array(value: Any, name: str, index: int) -> np.ndarray:
    arr = np.asarray(value.tolist() if isinstance(value, torch.Tensor) else value)
    if arr.ndim != 1 or not (arr.dtype.kind in "iub" or arr.size == 0):
        raise ValueError(
            f"sample {index}: {name} must be a flat list of integers, got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr.astype(np.int64)


def sample_tokens(sample: Mapping[str, Any], index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, unshifted labels: the trained token or -100) of one sample in any accepted form."""
    if not isinstance(sample, Mapping):
        raise TypeError(f"sample {index}: expected a dict of token lists, got {type(sample).__name__}")
    if "prompt_ids" in sample and "input_ids" not in sample:
        response_key = next((k for k in _RESPONSE_KEYS if k in sample), None)
        if response_key is None:
            raise KeyError(
                f"sample {index}: prompt_ids needs completion_ids or response_ids; keys: {sorted(sample)}"
            )
        prompt, response = (
            _array(sample["prompt_ids"], "prompt_ids", index),
            _array(sample[response_key], response_key, index),
        )
        ids = np.concatenate([prompt, response])
        labels = np.concatenate([np.full(len(prompt), IGNORE_INDEX, dtype=np.int64), response])
    elif "input_ids" in sample:
        ids = _array(sample["input_ids"], "input_ids", index)
        mask_key = next((k for k in _MASK_KEYS if k in sample), None)
        if "labels" in sample:
            labels = _array(sample["labels"], "labels", index)
        elif mask_key is not None:
            mask = _array(sample[mask_key], mask_key, index)
            if len(mask) != len(ids):
                raise ValueError(f"sample {index}: {mask_key} has {len(mask)} entries, input_ids {len(ids)}")
            labels = np.where(mask.astype(bool), ids, IGNORE_INDEX)
        else:
            labels = ids.copy()
    else:
        raise KeyError(
            f"sample {index}: needs input_ids (or prompt_ids + completion_ids); keys: {sorted(sample)}"
        )
    if len(ids) == 0:
        raise ValueError(f"sample {index}: no tokens")
    if len(labels) != len(ids):
        raise ValueError(f"sample {index}: labels has {len(labels)} entries, input_ids {len(ids)}")
    return ids, labels


def _samples(features: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Flatten items (samples, or rows = lists of samples) into (ids, labels) pairs."""
    out = []
    for item in features:
        for sample in item if isinstance(item, (list, tuple)) else [item]:
            out.append(sample_tokens(sample, len(out)))
    if not out:
        raise ValueError("PackedCollator: empty batch")
    return out


class PackedCollator:
    """Packs a list of tokenized samples into one row of packtune's packed batch (see module doc).

    `max_tokens`: refuse batches longer than this (group samples with `pack_samples` first).
    `batch_dim`: give `[1, T]` tensors (transformers models) or `[T]` (packtune's engine).
    """

    def __init__(self, *, max_tokens: int | None = None, batch_dim: bool = True) -> None:
        self.max_tokens, self.batch_dim = max_tokens, batch_dim

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        samples = _samples(features)
        batch = self._packed_batch(samples)
        row = (lambda t: t[None]) if self.batch_dim else (lambda t: t)
        # Hugging Face's labels: each sample's own trained tokens, -100 on its first token (which
        # no position of that sample predicts)
        hf_labels = np.concatenate([np.r_[IGNORE_INDEX, labels[1:]] for _, labels in samples])
        layout = batch.layout
        return {
            "input_ids": row(batch.input_ids),
            "labels": row(torch.from_numpy(hf_labels)),
            "shift_labels": row(batch.labels),
            "packed_layout": layout,
            "position_ids": row(layout.positions),
            "cu_seqlens": layout.cu_seqlens,
            "max_seqlen": layout.max_seqlen,
            "num_label_tokens": layout.num_label_rows,
        }

    def packed_batch(self, features: Sequence[Any]) -> PackedBatch:
        """The same row as packtune's `PackedBatch` (1-D tensors, labels already shifted per sample)."""
        return self._packed_batch(_samples(features))

    def _packed_batch(self, samples: list[tuple[np.ndarray, np.ndarray]]) -> PackedBatch:
        seq_lens = np.array([len(ids) for ids, _ in samples], dtype=np.int64)
        if self.max_tokens is not None and seq_lens.sum() > self.max_tokens:
            raise ValueError(
                f"PackedCollator: {int(seq_lens.sum())} tokens exceed max_tokens={self.max_tokens}; "
                "group samples with packtune.integrations.pack_samples or lower the batch size"
            )
        ids = np.concatenate([s[0] for s in samples])
        targets = np.concatenate([s[1] for s in samples])
        return build_packed_batch(ids, targets, targets != IGNORE_INDEX, seq_lens)


def pack_samples(samples: Sequence[Mapping[str, Any]], max_tokens: int) -> list[list[Mapping[str, Any]]]:
    """Group samples into rows of at most `max_tokens` tokens by best-fit decreasing (packtune's
    packing); each row is one item for `PackedCollator` (e.g. a dataset with batch size 1)."""
    lengths = np.array([len(sample_tokens(s, i)[0]) for i, s in enumerate(samples)], dtype=np.int64)
    if len(lengths) == 0:
        return []
    if lengths.max() > max_tokens:
        raise ValueError(
            f"pack_samples: sample {int(lengths.argmax())} has {int(lengths.max())} tokens, more than "
            f"max_tokens={max_tokens}; truncate it or raise max_tokens"
        )
    order, offsets = rows_from_assignment(best_fit_decreasing(lengths, max_tokens))
    return [[samples[i] for i in order[offsets[r] : offsets[r + 1]]] for r in range(len(offsets) - 1)]
