"""packtune's fused loss at a transformers model's LM head, for the HF Trainer and for TRL.

`fused_loss` is the loss `apply_packtune(fused_loss=True)` computes in training. TRL's trainers
(1.16: SFT, DPO, KTO, GRPO, RLOO) do not ask the model for its loss: they install TRL's own
chunked LM head on `model.forward` (`trl.trainer.utils.add_fused_lm_head`) and call
`model(**inputs, fused_lm_head=True)`, expecting per-token `log_probs` (SFT's loss is
`-log_probs.sum() / num_items_in_batch`; DPO sums them per sequence), `label_mask` and the
metrics' fields: `entropy`, `is_top1`, and for DPO `mean_logits` (its `logits/chosen` and
`logits/rejected`) and `log_sum_sq_probs` (WPO's weights). The patched forward answers that call
with `fused_lm_head_output`: the per-token log-probabilities come from packtune's fused linear
cross-entropy (reduction="none", so every TRL loss type, DFT's per-token weights and DPO's
per-sequence sums included, gets exact gradients), and the other fields, which TRL computes
without gradient, from one extra, gradient-free pass of the head over the label rows. Both under
the logit transform TRL gave its head (`HeadTransform`: GRPO's and RLOO's sampling temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from packtune.kernels import IGNORE_INDEX, PackedLayout, linear_cross_entropy

_STATS_CHUNK_ROWS = 4096


@dataclass
class FusedLMHeadOutput(ModelOutput):
    """The fields of TRL's `FusedCausalLMOutput` that SFTTrainer reads; per-token fields are zero
    where the label is -100, shaped `(batch, seq_len - 1)`, or `(batch, seq_len)` given `shift_labels`."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass(frozen=True)
class HeadTransform:
    """What TRL's `add_fused_lm_head` was told to do to the logits x = h W^T + b, read from the
    forward it installed (`trl_head` in transformers.py): with Gemma's cap c,
    z = c tanh(logit_scale x / c) / temperature, else z = logit_scale x / temperature; `fp32`: the
    head in float32, outside autocast (`cast_lm_head_to_fp32`). GRPO and RLOO pass their sampling
    temperature, so their log-probs are those of the distribution the completions were drawn from.

    The fused kernel computes c' tanh(x' / c') of the linear x'; with x' = s x (s = logit_scale /
    temperature: the hidden states and the bias scaled by s) and c' = c / temperature that is
    exactly z, so every transform runs on the same kernel."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    fp32: bool = False

    @property
    def scale(self) -> float:
        return self.logit_scale / self.temperature

    def softcap(self, softcap: float | None) -> float | None:
        return None if softcap is None else softcap / self.temperature


def fused_loss(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, num_items,
               reduction: str | None = None, layout: PackedLayout | None = None,
               softcap: float | None = None, scale: float = 1.0, fp32: bool = False) -> torch.Tensor:
    """linear_cross_entropy over the flat hidden states (reduction: "sum" over `num_items` when given,
    else "mean"; `softcap`: Gemma's final-logit cap; `scale`: the logits x = h W^T + b multiplied by
    it, through h and b); under autocast the matmuls run in the autocast dtype, as `lm_head(hidden)`
    would (the kernel itself then runs with autocast off), unless `fp32`."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = lm_head.weight, lm_head.bias
    device = hidden.device.type
    dtype = torch.float32 if fp32 else torch.get_autocast_dtype(device)
    if fp32 or torch.is_autocast_enabled(device):
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    if reduction is None:
        reduction = "sum" if num_items is not None else "mean"
    with torch.autocast(device, enabled=False):
        return linear_cross_entropy(hidden, weight, targets, bias=bias, num_items=num_items,
                                    reduction=reduction, layout=layout, softcap=softcap)


def fused_lm_head_output(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, *,
                         drop_last: bool, num_items, softcap: float | None = None,
                         head: HeadTransform = HeadTransform()) -> FusedLMHeadOutput:
    """TRL's `fused_lm_head=True` answer from packtune's kernel. `hidden` [B, L, H], `targets` the
    flat shifted labels [B * L]; `drop_last`: the caller gave unshifted labels, so TRL expects L - 1
    positions (the last one has no target); `softcap`: Gemma's final-logit cap; `head`: what TRL's
    head was told to do to the logits (temperature, scale, fp32)."""
    softcap = head.softcap(softcap)
    nll = fused_loss(hidden, lm_head, targets, None, reduction="none", softcap=softcap, scale=head.scale,
                     fp32=head.fp32).float()
    mask = targets != IGNORE_INDEX
    stats = _head_stats(hidden, lm_head, targets, mask, softcap, head)
    shape = hidden.shape[:-1]

    def per_token(t: torch.Tensor) -> torch.Tensor:
        t = t.view(shape)
        return t[:, :-1] if drop_last else t

    denominator = mask.sum().clamp(min=1) if num_items is None else num_items
    return FusedLMHeadOutput(loss=nll.sum() / denominator, log_probs=per_token(-nll),
                             **{name: per_token(t) for name, t in stats.items()}, label_mask=per_token(mask))


@torch.no_grad()
def _head_stats(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, mask: torch.Tensor,
                softcap: float | None, head: HeadTransform) -> dict[str, torch.Tensor]:
    """TRL's gradient-free per-token fields of the next-token distribution on the label rows, zero
    elsewhere: its entropy, log(sum_v p_v^2), the mean of the (capped) logits over the vocabulary,
    and whether the label is the most likely token."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    zeros = torch.zeros(flat.shape[0], dtype=torch.float32, device=flat.device)
    stats = {"entropy": zeros, "log_sum_sq_probs": zeros.clone(), "mean_logits": zeros.clone(),
             "is_top1": torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)}
    rows = mask.nonzero()[:, 0]
    for start in range(0, len(rows), _STATS_CHUNK_ROWS):
        r = rows[start : start + _STATS_CHUNK_ROWS]
        if head.fp32:
            with torch.autocast(flat.device.type, enabled=False):
                logits = F.linear(flat[r].float(), lm_head.weight.float(),
                                  None if lm_head.bias is None else lm_head.bias.float())
        else:
            logits = lm_head(flat[r]).float()
        logits = logits * head.scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        log_p = logits.log_softmax(-1)
        stats["entropy"][r] = -(log_p.exp() * log_p).sum(-1)
        stats["log_sum_sq_probs"][r] = torch.logsumexp(2 * log_p, -1)
        stats["mean_logits"][r] = logits.mean(-1)
        stats["is_top1"][r] = logits.argmax(-1) == targets[r]
    return stats
