"""The training loss of an encoder-decoder (T5) on a packed row of pairs: the decoder's summed token
cross-entropy divided by the step's global label-token count (`num_items`), as `CausalLMLoss`
(engine/loss.py) computes it for the decoders.

The fused linear cross-entropy reads the decoder's final hidden states (already scaled where T5
scales them), `lm_head` and the decoder's `PackedLayout` (its label rows), inside this module's
forward, so that under FSDP the root's parameters (the shared embedding, the final norms, lm_head)
are unsharded when the kernel reads `lm_head.weight` (see engine/loss.py).
"""

from __future__ import annotations

import torch
from torch import nn

from packtune.kernels import Seq2SeqLayout, linear_cross_entropy


class Seq2SeqLoss(nn.Module):
    """Wraps a `T5ForConditionalGeneration`; forward returns the loss of a packed row of pairs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        layout: Seq2SeqLayout,
        num_items: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        router_weight: float = 0.0,
        *,
        decoder_input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids `[Te]`, labels and decoder_input_ids `[Td]` (model/t5_batch.py: the Trainer passes
        `decoder_input_ids` from `T5Batch.loss_inputs()`); `loss_weights` fp32 per decoder token, None for
        token weighting. `router_weight`: the Trainer's weight of router losses (`CausalLMLoss`), which a
        T5 has none of."""
        hidden = self.model.hidden_states(input_ids, decoder_input_ids, layout)
        return linear_cross_entropy(hidden, self.model.lm_head, labels, weights=loss_weights, reduction="sum",
                                    num_items=num_items, layout=layout.decoder)
