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


class RouterLossTerms(nn.Module):
    """A loss module over `self.model` that adds a mixture of experts' router losses (a model whose
    forward leaves `router_loads`, packtune.model.moe): `router_weight` x (aux_coef x the
    load-balancing loss + z_coef x the z-loss) of the micro-batch's tokens, on the device, no sync.
    The Trainer passes router_weight = 1 / the step's micro-batches over all ranks, so the step adds
    their mean (0 in evaluation). The micro-batch's (aux, z) and per-layer expert counts are left in
    `router_stats` for the metrics."""

    def __init__(self, model: nn.Module, aux_coef: float = 0.0, z_coef: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.aux_coef, self.z_coef = aux_coef, z_coef
        self.router_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        """(aux loss, z-loss) [2] and expert counts [sparse layers, E] of the last forward, detached."""

    def with_router_losses(self, loss: torch.Tensor, router_weight: float) -> torch.Tensor:
        loads = getattr(self.model, "router_loads", None)
        if not loads:
            return loss
        from packtune.model.moe import router_losses

        aux, z = router_losses(loads)
        self.router_stats = (torch.stack([aux, z]).detach().float(),
                             torch.stack([load.counts for load in loads]).detach().float())
        if router_weight and (self.aux_coef or self.z_coef):
            loss = loss + router_weight * (self.aux_coef * aux + self.z_coef * z).to(loss.dtype)
        return loss


class CausalLMLoss(RouterLossTerms):
    """Wraps a causal LM with `hidden_states(...)` and `lm_head`; forward returns the loss (plus a
    mixture of experts' router losses, see RouterLossTerms)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        layout: PackedLayout,
        num_items: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        router_weight: float = 0.0,
    ) -> torch.Tensor:
        hidden = self.model.hidden_states(input_ids, layout)
        loss = linear_cross_entropy(hidden, self.model.lm_head, labels, weights=loss_weights, reduction="sum",
                                    num_items=num_items, layout=layout, softcap=self.final_logit_softcap)
        return self.with_router_losses(loss, router_weight)

    @property
    def final_logit_softcap(self) -> float | None:
        """Gemma 2's output-logit cap, applied inside the fused loss (models without `args` have none)."""
        args = getattr(self.model, "args", None)
        return getattr(args, "final_logit_softcapping", None)
