"""The packtune ops the integrations call, gathered in one place.

TEMPORARY: the cross-entropy branch is not merged yet; until it is, the loss names below fall
back to plain-PyTorch equivalents. This file is replaced by direct
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


__all__ = [
    "linear_cross_entropy",
    "masked_cross_entropy",
    "positions_from_cu_seqlens",
    "rms_norm",
    "rotary",
    "swiglu",
    "varlen_attention",
]
