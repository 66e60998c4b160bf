"""The preference loss inside the FSDP root's forward, as CausalLMLoss is for SFT (engine/loss.py).

The model's hidden states of a row of pairs go straight into `linear_logprobs` (the fused label
log-probs: no `[tokens x vocab]` logits), summed per segment (segment 2j: pair j's chosen side,
2j + 1: its rejected side, in every layout: packed, prefix-shared or padded) with the label-token
count of each, then the objective's per-pair terms (objectives.py), divided by the step's global
pair and chosen-token counts (`num_items`, a device tensor: no host sync).

Called without `num_items`, the forward returns the `[pairs, 2]` log-probs alone: the reference
pass (reference.py) and `packtune eval` read them so.

A mixture of experts adds its router losses as in SFT (engine/loss.py's RouterLossTerms); a prompt
two sides share counts twice in the router load (GatheredKeys.multiplicity), so prefix sharing
changes neither the loss nor its gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from packtune.config import Config, PreferenceConfig
from packtune.config.train import router_coefficients
from packtune.errors import ConfigError
from packtune.kernels import PackedLayout, layout_segments, linear_logprobs
from packtune.loss import RouterLossTerms
from packtune.preference.objectives import metric_names, step_loss


class PreferenceLoss(RouterLossTerms):
    """Wraps a causal LM with `hidden_states(...)` and `lm_head`; forward returns (loss, metrics)."""

    def __init__(self, model: nn.Module, objective: str, cfg: PreferenceConfig, aux_coef: float = 0.0,
                 z_coef: float = 0.0) -> None:
        super().__init__(model, aux_coef, z_coef)
        self.objective, self.cfg = objective, cfg
        self.metric_names = metric_names(objective, cfg)
        """What the second output's entries are (logged under these names)."""

    def logps(self, input_ids: torch.Tensor, labels: torch.Tensor, layout: PackedLayout
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed label log-probs, label-token counts), both `[pairs, 2]` (chosen, rejected)."""
        hidden = self.model.hidden_states(input_ids, layout)
        segments, n = layout_segments(layout)
        softcap = getattr(getattr(self.model, "args", None), "final_logit_softcapping", None)
        logps, counts = linear_logprobs(hidden, self.model.lm_head, labels, segments, n, softcap=softcap,
                                        return_counts=True, layout=layout)
        return logps.view(-1, 2), counts.view(-1, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, layout: PackedLayout,
                num_items: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None,
                ref_logps: torch.Tensor | None = None, router_weight: float = 0.0
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`num_items`: the step's [pairs, chosen label tokens] (float device tensor); `loss_weights`
        must be None (pairs are weighted by the objective); `router_weight`: see RouterLossTerms."""
        if loss_weights is not None:
            raise ValueError("a preference objective takes no per-token loss weights")
        logps, counts = self.logps(input_ids, labels, layout)
        if num_items is None:
            return logps
        pairs, chosen_tokens = num_items
        loss, metrics = step_loss(self.objective, self.cfg, logps, counts, ref_logps, pairs, chosen_tokens)
        return self.with_router_losses(loss, router_weight), metrics


def preference_loss(cfg: Config, model: nn.Module) -> PreferenceLoss:
    """The run's preference loss over `model`, whose family must take rows with shared prompts when
    `preference.shared_prompt` packs them so."""
    from packtune.data.rows import preference_refusal
    from packtune.model.families import family_for

    args = getattr(model, "args", None)
    if args is not None and family_for(args.model_type).encoder_decoder:
        raise ConfigError(preference_refusal(cfg.train.objective, args.model_type))
    if cfg.preference.shared_prompt and cfg.data.packing:
        why = shared_prompt_unsupported(model)
        if why:
            raise ConfigError(f"preference.shared_prompt: {why}; set preference.shared_prompt = false")
    router = router_coefficients(cfg.train, getattr(args, "router_aux_loss_coef", 0.0))
    return PreferenceLoss(model, cfg.train.objective, cfg.preference, *router)


def shared_prompt_unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot run rows with shared prompts, or None when it can."""
    from packtune.model.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        return (f"{type(model).__name__} has no attention over gathered keys (prefix sharing needs a "
                "Llama-family model)")
    if any(getattr(m, "sinks", None) is not None for m in model.modules()):
        return "attention sinks (gpt-oss) are not supported over gathered keys"
    scaling = model.args.rope_scaling
    if scaling is not None and scaling.rope_type == "longrope":
        return ("longrope picks each sample's RoPE factors by its length, which two sides sharing a prompt "
                "do not share")
    return None
