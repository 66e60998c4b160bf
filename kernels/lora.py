"""Fused LoRA linear: y = x W^T + b + s * (drop(x) A^T) B^T, whose backward never forms dW or W + s B A.

Shapes: x [..., in], W [out, in] (frozen, any float dtype or a torchao NF4 tensor), A [r, in],
B [out, r], s the LoRA scale. With u = drop(x) A^T ([N, r], tiny) and g = dy:

    dB = s g^T u                 [out, r]
    du = s g B                   [N, r]
    dA = du^T drop(x)            [r, in]
    dx = g W + drop'(du A)       [N, in]   (drop' applies the same mask and 1 / (1 - p))

Forward saves x and u only (PEFT's eager lora.Linear also keeps the dropout output and the
separate base and LoRA outputs); the LoRA update is accumulated into the base output in place
(`addmm_`), and dx likewise. The base weight gets no gradient: no [out, in] buffer is ever
allocated besides W itself (dequantised per call when it is NF4, never saved).

Dropout (on the LoRA input only, as PEFT) draws its mask from a seed: the module passes a seed
taken from torch's CPU generator (seeded by the run, saved in checkpoints), and the backward
regenerates the same mask from it instead of storing it, so the mask costs no memory and a
resumed run draws the same masks as an uninterrupted one.

Why no Triton kernel: both passes are five GEMMs whose cost is the two [N, in] x [in, out] ones;
BLAS / cuBLAS run those at peak, and what a hand-written kernel could fuse (the rank-r epilogue)
is a few percent of the FLOPs. `lora_linear_ref` is the specification (plain autograd, fp64 in
the tests).
"""

from __future__ import annotations

import torch

__all__ = ["LoRALinearFunction", "dense_weight", "dropout_mask", "lora_linear", "lora_linear_ref"]


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` as a plain tensor of `dtype`: dequantises a torchao NF4 tensor, casts otherwise."""
    if hasattr(weight, "get_original_weight"):  # torchao NF4Tensor
        return weight.get_original_weight().to(dtype)
    return weight.to(dtype)


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype
                 ) -> torch.Tensor:
    """Inverted-dropout multiplier (0 or 1 / (1 - p)) drawn from `seed`: the same seed, the same mask."""
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    return x if p == 0.0 else x * dropout_mask(x.shape, p, seed, x.device, x.dtype)


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float, dropout: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The specification: PEFT's lora.Linear forward (base output plus the scaled low-rank update)."""
    base = torch.nn.functional.linear(x, dense_weight(weight, x.dtype), bias)
    x2 = x.reshape(-1, x.shape[-1])
    update = _dropped(x2, dropout, seed) @ lora_a.to(x.dtype).t() @ lora_b.to(x.dtype).t()
    return base + scale * update.view(*x.shape[:-1], -1)


class LoRALinearFunction(torch.autograd.Function):
    """Forward and backward of one LoRA linear on [N, in] rows; no gradient for W and the bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout: float, seed: int) -> torch.Tensor:
        dtype = x.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        w = dense_weight(weight, dtype)
        u = _dropped(x, dropout, seed) @ a.t()
        y = torch.addmm(bias.to(dtype), x, w.t()) if bias is not None else x @ w.t()
        y.addmm_(u, b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, u)
        ctx.scale, ctx.dropout, ctx.seed = scale, dropout, seed
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, lora_a, lora_b, u = ctx.saved_tensors
        dtype, s = x.dtype, ctx.scale
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        dy = dy.contiguous()
        db = (dy.t() @ u).mul_(s).to(lora_b.dtype) if ctx.needs_input_grad[4] else None
        du = (dy @ b).mul_(s)
        mask = dropout_mask(x.shape, ctx.dropout, ctx.seed, x.device, dtype) if ctx.dropout else None
        da = None
        if ctx.needs_input_grad[3]:
            da = (du.t() @ (x if mask is None else x * mask)).to(lora_a.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            lora_dx = du @ a
            dx = dy @ dense_weight(weight, dtype)
            dx += lora_dx if mask is None else lora_dx.mul_(mask)
        return dx, None, None, da, db, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout: float = 0.0, seed: int = 0) -> torch.Tensor:
    """y = x W^T + bias + scale * (drop(x) A^T) B^T for x [..., in]; computes in x's dtype.

    `dropout` (0 <= p < 1) applies to the LoRA branch's input only, its mask drawn from `seed`.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1), got {dropout}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = LoRALinearFunction.apply(x2, weight, bias, lora_a, lora_b, float(scale), float(dropout), int(seed))
    return y.view(*x.shape[:-1], y.shape[-1])
