"""The training loss: summed token cross-entropy divided by the step's global label-token count
(under sample/turn loss weighting: each token's loss times its weight, divided by the step's
global sample/turn count; the batch carries the weights).

The fused linear cross-entropy (packtune.kernels) applies lm_head and the masked loss chunk by
chunk over the label rows only, without storing the N x V logits; `num_items` is a device
tensor and the label rows come from the batch's PackedLayout, so the step needs no host
sync. Zero label tokens give zero loss and gradients.

`CausalLMLoss` is the module FSDP shards as its root. The loss runs *inside* its forward, so
the root's parameters (embeddings, final norm, lm_head) are unsharded while the fused linear
cross-entropy reads `lm_head.weight` directly; a kernel called outside the forward would see
the sharded DTensor instead (the problem torchtitan's chunked loss and Liger's FSDP redirect
solve). Gradients flow back into the unsharded weight and FSDP reduce-scatters them as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from packtune.kernels import PackedLayout, linear_cross_entropy


class CausalLMLoss(nn.Module):
    """Wraps a causal LM with `hidden_states(...)` and `lm_head`; forward returns the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        layout: PackedLayout,
        num_items: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.model.hidden_states(input_ids, layout)
        return linear_cross_entropy(hidden, self.model.lm_head, labels, weights=loss_weights, reduction="sum",
                                    num_items=num_items, layout=layout,
                                    softcap=self.final_logit_softcap)

    @property
    def final_logit_softcap(self) -> float | None:
        """Gemma 2's output-logit cap, applied inside the fused loss (models without `args` have none)."""
        args = getattr(self.model, "args", None)
        return getattr(args, "final_logit_softcapping", None)
