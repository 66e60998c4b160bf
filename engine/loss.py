"""The training loss: summed token cross-entropy divided by the step's global label-token count.

`CausalLMLoss` is the module FSDP shards as its root. The loss runs *inside* its forward, so
the root's parameters (embeddings, final norm, lm_head) are unsharded while the fused linear
cross-entropy reads `lm_head.weight` directly; a kernel called outside the forward would see
the sharded DTensor instead (the problem torchtitan's chunked loss and Liger's FSDP redirect
solve). Gradients flow back into the unsharded weight and FSDP reduce-scatters them as usual.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


def token_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | None
) -> torch.Tensor:
    """sum over label tokens of -log p(label), divided by `num_items` (if given); [N, H] hidden.

    Zero label tokens give 0 (and zero gradients), never NaN.
    """
    logits = (hidden @ weight.t()).float()
    losses = nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    total = losses.sum()
    if num_items is None:
        return total
    return total / num_items.clamp(min=1)


class CausalLMLoss(nn.Module):
    """Wraps a causal LM with `hidden_states(...)` and `lm_head`; forward returns the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        num_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.model.hidden_states(
            input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
        )
        hidden = hidden.reshape(-1, hidden.shape[-1])
        return token_loss_sum(hidden, self.model.lm_head.weight, labels.reshape(-1), num_items)
