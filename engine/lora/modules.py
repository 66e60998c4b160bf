"""The modules that replace a model's linears (and MLPs) when it trains with LoRA.

`LoRALinear` keeps the base's parameter names (`weight`, `bias`, frozen) beside `lora_A` [r, in]
and `lora_B` [out, r], so the base still loads from a Hugging Face checkpoint by its own names.
`LoRAMLP` replaces a gated MLP whose three projections are all LoRALinear, running the fused
LoRA MLP kernel; its submodules keep their names (`gate_proj`, ...), so its state dict is the
same as that of an MLP of LoRALinears.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from packtune.kernels.dropout import draw_seed
from packtune.kernels.lora import dense_weight, lora_linear
from packtune.kernels.lora_mlp import lora_mlp
from packtune.kernels.nf4_matmul import is_nf4


class LoRALinear(nn.Module):
    """y = x W^T + b + scale * (drop(x) A^T) B^T over a frozen base W (see packtune.kernels.lora)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.rank, self.scale, self.dropout = rank, scale, dropout
        if not self.lora_A.is_meta:
            self.reset_lora()

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """PEFT's init: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero, so the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B)

    @property
    def draws_random(self) -> bool:
        """Its forward draws dropout seeds (activation checkpointing must replay them)."""
        return self.dropout > 0

    def lora_args(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        return self.weight, self.bias, self.lora_A, self.lora_B

    def active_dropout(self) -> float:
        """Dropout applies in training forwards that build a graph: not in eval mode, and not in
        the trainer's gradient-free held-out evaluation (which would also consume the RNG)."""
        return self.dropout if self.training and torch.is_grad_enabled() else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.active_dropout()
        return lora_linear(x, *self.lora_args(), self.scale, p, draw_seed(x.device) if p else 0)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + scale * B A, in `dtype` (default: the base's; fp32 for an NF4 base)."""
        dtype = dtype or (torch.float32 if is_nf4(self.weight) else self.weight.dtype)
        w = dense_weight(self.weight, torch.float32)
        return (w + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, dropout={self.dropout}")


class LoRAMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with all three projections LoRALinear, through the fused kernel;
    `activation` "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)."""

    def __init__(self, gate_proj: LoRALinear, up_proj: LoRALinear, down_proj: LoRALinear,
                 activation: str = "silu") -> None:
        super().__init__()
        if len({gate_proj.scale, up_proj.scale, down_proj.scale}) != 1:
            raise ValueError("LoRAMLP: the three projections must share one LoRA scale")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.gate_proj.active_dropout()
        seeds = draw_seed(x.device, 3) if p else (0, 0, 0)
        return lora_mlp(x, self.gate_proj.lora_args(), self.up_proj.lora_args(), self.down_proj.lora_args(),
                        self.gate_proj.scale, p, seeds, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
