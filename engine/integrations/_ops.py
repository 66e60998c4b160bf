"""The packtune ops the integrations call, gathered in one place.

TEMPORARY: the kernel and data branches (cross-entropy, packed-sequence ops, packing) are not
merged yet; until
they are, the names below fall back to plain-PyTorch equivalents. This file is replaced by direct
`packtune.kernels` imports at merge time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packtune.kernels import rms_norm, rotary, swiglu, varlen_attention
from packtune.kernels.rotary import positions_from_cu_seqlens

try:
    from packtune.kernels import linear_cross_entropy, masked_cross_entropy
except ImportError:

    def masked_cross_entropy(logits, labels, *, ignore_index=-100, reduction="mean", num_items=None, **_):
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=ignore_index,
            reduction="sum",
        )
        if num_items is None:
            if reduction == "sum":
                return total
            num_items = (labels != ignore_index).sum()
        return total / torch.as_tensor(num_items, device=total.device).float().clamp(min=1)

    def linear_cross_entropy(hidden, weight, labels, *, bias=None, **options):
        if isinstance(weight, torch.nn.Module):
            bias = weight.bias if bias is None else bias
            weight = weight.weight
        return masked_cross_entropy(F.linear(hidden, weight, bias), labels, **options)


try:
    from packtune.data.packing import PackedBatch, best_fit_decreasing, rows_from_assignment, shifted_labels
except ImportError:
    from dataclasses import dataclass

    import numpy as np

    @dataclass
    class PackedBatch:
        input_ids: torch.Tensor
        labels: torch.Tensor
        position_ids: torch.Tensor
        cu_seqlens: torch.Tensor
        max_seqlen: int
        num_label_tokens: int

    def best_fit_decreasing(lengths, capacity, *, backend=None):
        row_of, room = np.empty(len(lengths), dtype=np.int64), []
        for i in np.argsort(-np.asarray(lengths), kind="stable"):
            fits = [r for r, left in enumerate(room) if left >= lengths[i]]
            row = min(fits, key=lambda r: room[r]) if fits else len(room)
            if not fits:
                room.append(capacity)
            room[row] -= lengths[i]
            row_of[i] = row
        return row_of

    def rows_from_assignment(row_of):
        order = np.argsort(row_of, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(row_of))])
        return order, offsets

    def shifted_labels(ids, mask, seq_lens):
        labels = np.full(len(ids), -100, dtype=np.int64)
        labels[:-1] = np.where(mask[1:], ids[1:], -100)
        labels[np.cumsum(seq_lens) - 1] = -100
        return labels


__all__ = [
    "PackedBatch",
    "best_fit_decreasing",
    "rows_from_assignment",
    "shifted_labels",
    "linear_cross_entropy",
    "masked_cross_entropy",
    "positions_from_cu_seqlens",
    "rms_norm",
    "rotary",
    "swiglu",
    "varlen_attention",
]
