"""Fused LoRA MLP: y = down(silu(gate(x)) * up(x)) with a LoRA update on each of the three linears.

Each linear is `lin(x) = x W^T + b + s * (drop(x) A^T) B^T` (see lora.py). The forward saves x, the
two [N, I] pre-activations g and u and the three rank-r products, and nothing else: the
activation h = silu(g) * u (the down projection's input) is recomputed in the backward by the
SwiGLU kernel, as is its gradient. PEFT's eager MLP keeps g, silu(g), u, h and the dropout
outputs: four [N, I] tensors where this keeps two. Frozen bases get no gradient; only x, the A
and the B matrices do.

Dropout masks (one seed per linear, as PEFT draws one mask per layer) are regenerated in the
backward from their seeds, never stored.
"""

from __future__ import annotations

import torch

from packtune.kernels.lora import dense_weight, dropout_mask, lora_linear_ref
from packtune.kernels.swiglu import swiglu_backward, swiglu_forward, swiglu_ref

__all__ = ["LoRAMLPFunction", "lora_mlp", "lora_mlp_ref"]

LoRAWeights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]
"""(W, bias, A, B) of one LoRA linear."""


def _linear_ref(x: torch.Tensor, lin: LoRAWeights, scale: float, p: float, seed: int) -> torch.Tensor:
    return lora_linear_ref(x, *lin, scale, p, seed)


def lora_mlp_ref(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, scale: float,
                 dropout: float = 0.0, seeds: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """The specification: PEFT-wrapped LlamaMLP, down(silu(gate(x)) * up(x))."""
    g = _linear_ref(x, gate, scale, dropout, seeds[0])
    h = swiglu_ref(g, _linear_ref(x, up, scale, dropout, seeds[1]))
    return _linear_ref(h, down, scale, dropout, seeds[2])


def _mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor | None:
    return dropout_mask(x.shape, p, seed, x.device, x.dtype) if p else None


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _forward_linear(x: torch.Tensor, lin: LoRAWeights, scale: float, mask: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + b + s u B^T, u) with u = drop(x) A^T."""
    w, bias, a, b = lin
    dtype = x.dtype
    u = _masked(x, mask) @ a.to(dtype).t()
    wd = dense_weight(w, dtype)
    y = torch.addmm(bias.to(dtype), x, wd.t()) if bias is not None else x @ wd.t()
    return y.addmm_(u, b.to(dtype).t(), alpha=scale), u


def _backward_linear(dy: torch.Tensor, x: torch.Tensor, u: torch.Tensor, lin: LoRAWeights, scale: float,
                     mask: torch.Tensor | None, need_dx: bool):
    """(dx or None, dA, dB) of one LoRA linear given its output gradient."""
    w, _, a, b = lin
    dtype = dy.dtype
    db = (dy.t() @ u).mul_(scale).to(b.dtype)
    du = (dy @ b.to(dtype)).mul_(scale)
    da = (du.t() @ _masked(x, mask)).to(a.dtype)
    dx = None
    if need_dx:
        lora_dx = du @ a.to(dtype)
        dx = dy @ dense_weight(w, dtype)
        dx += lora_dx if mask is None else lora_dx.mul_(mask)
    return dx, da, db


class LoRAMLPFunction(torch.autograd.Function):
    """Forward and backward of the LoRA MLP on [N, H] rows; gradients for x and the six A/B only."""

    @staticmethod
    def forward(ctx, x, wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d, scale, dropout, seeds):
        gate, up, down = (wg, bg, ag, b_g), (wu, bu, au, b_u), (wd, bd, ad, b_d)
        g, ug = _forward_linear(x, gate, scale, _mask(x, dropout, seeds[0]))
        u, uu = _forward_linear(x, up, scale, _mask(x, dropout, seeds[1]))
        h = swiglu_forward(g, u)
        y, ud = _forward_linear(h, down, scale, _mask(h, dropout, seeds[2]))
        del h
        ctx.save_for_backward(x, g, u, ug, uu, ud, wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d)
        ctx.scale, ctx.dropout, ctx.seeds = scale, dropout, seeds
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, u, ug, uu, ud, *weights = ctx.saved_tensors
        gate, up, down = tuple(weights[0:4]), tuple(weights[4:8]), tuple(weights[8:12])
        s, p, seeds = ctx.scale, ctx.dropout, ctx.seeds
        dy = dy.contiguous()
        h = swiglu_forward(g, u)
        dh, dad, dbd = _backward_linear(dy, h, ud, down, s, _mask(h, p, seeds[2]), need_dx=True)
        del h
        dg, du = swiglu_backward(dh, g, u)
        del dh
        need_dx = ctx.needs_input_grad[0]
        dxg, dag, dbg = _backward_linear(dg, x, ug, gate, s, _mask(x, p, seeds[0]), need_dx)
        dxu, dau, dbu = _backward_linear(du, x, uu, up, s, _mask(x, p, seeds[1]), need_dx)
        dx = dxg.add_(dxu) if need_dx else None
        return dx, None, None, dag, dbg, None, None, dau, dbu, None, None, dad, dbd, None, None, None


def lora_mlp(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, scale: float,
             dropout: float = 0.0, seeds: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x [..., H], each linear a LoRA linear given as (W, bias, A, B)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_mlp: dropout must be in [0, 1), got {dropout}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = LoRAMLPFunction.apply(x2, *gate, *up, *down, float(scale), float(dropout), tuple(map(int, seeds)))
    return y.view(*x.shape[:-1], y.shape[-1])
