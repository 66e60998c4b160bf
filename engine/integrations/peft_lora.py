"""PEFT's LoRA layers through packtune's fused LoRA kernels (apply_packtune on a PEFT model).

A PEFT `lora.Linear` computes `base(x) + B(A(dropout(x))) * scaling` for each active adapter.
When a layer is the plain case, one active adapter over a plain `nn.Linear` base, no DoRA or
other variant, no bias on B, not merged, adapters enabled, no per-call `adapter_names`, its
forward runs packtune's `lora_linear` on PEFT's own parameters (`base_layer.weight`,
`lora_A[name].weight`, `lora_B[name].weight`), so the adapter trains in place and PEFT's
`save_pretrained` saves it as before. Any other case calls PEFT's own forward, decided per call
(an adapter can be disabled or merged after apply_packtune). A gated MLP whose three projections
are all such layers, with one scale and one dropout, runs the fused `lora_mlp`.

Dropout: PEFT's `nn.Dropout` draws its mask from torch's global generator; here the mask comes
from a seed drawn from torch's CPU generator (packtune's kernels regenerate it in the backward
instead of storing it), so with dropout on the masks differ from PEFT's, not their distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from packtune.kernels.dropout import draw_seed
from packtune.kernels.lora import lora_linear
from packtune.kernels.lora_mlp import lora_mlp


def is_peft_lora_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear" and type(module).__module__.startswith("peft.tuners.lora")


def fused_lora_args(layer: nn.Module) -> tuple[tuple, float, float] | None:
    """((W, bias, A, B), scale, dropout p) when `layer` is a PEFT lora.Linear the fused kernel computes
    exactly as PEFT does; None otherwise (PEFT's forward runs)."""
    if not is_peft_lora_linear(layer) or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
        return None
    name = active[0]
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if type(base) is not nn.Linear or lora_a.bias is not None or lora_b.bias is not None:
        return None
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout):
        p = dropout.p if dropout.training else 0.0
    elif isinstance(dropout, nn.Identity):
        p = 0.0
    else:
        return None
    return (base.weight, base.bias, lora_a.weight, lora_b.weight), float(layer.scaling[name]), p


def peft_lora_linear_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    fused = None if args or kwargs else fused_lora_args(self)
    if fused is None:
        return type(self).forward(self, x, *args, **kwargs)
    lin, scale, p = fused
    return lora_linear(x, *lin, scale, p, draw_seed(x.device) if p else 0)


def is_peft_lora_mlp(mlp: nn.Module) -> bool:
    return all(is_peft_lora_linear(getattr(mlp, name, None)) for name in ("gate_proj", "up_proj",
                                                                          "down_proj"))


def peft_lora_mlp_forward_for(activation: str, plain_forward: Callable) -> Callable:
    """The gated MLP's forward with `activation` ("silu" or "gelu_tanh"): the fused `lora_mlp` when
    its three projections allow it, else `plain_forward` (packtune's SwiGLU / GeGLU between the
    projections' own forwards), decided on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = [fused_lora_args(proj) for proj in (self.gate_proj, self.up_proj, self.down_proj)]
        if all(f is not None for f in fused) and len({(f[1], f[2]) for f in fused}) == 1:
            scale, p = fused[0][1], fused[0][2]
            seeds = draw_seed(x.device, 3) if p else (0, 0, 0)
            return lora_mlp(x, fused[0][0], fused[1][0], fused[2][0], scale, p, seeds, activation)
        return plain_forward(self, x)

    return forward
