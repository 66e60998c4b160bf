"""Fused LoRA MLP: y = down(act(gate(x)) * up(x)) with a LoRA update on each of the three linears.

Each linear is `lin(x) = x W^T + b + s * (drop(x) A^T) B^T` (see lora.py); `act` is SiLU (SwiGLU:
Llama, Mistral, Qwen) or tanh-approximated GELU (GeGLU: Gemma). The forward saves x, the two
[N, I] pre-activations g and u and the three rank-r products, and nothing else: the activation
h = act(g) * u (the down projection's input) is recomputed in the backward, as is its gradient.
PEFT's eager MLP keeps g, act(g), u, h and the dropout outputs: four [N, I] tensors where this
keeps two. Frozen bases get no gradient; only x, the A and the B matrices do.

Backends (`lora_mlp` op): the six big GEMMs are torch.matmul everywhere (but the base GEMMs over
NF4 weights on `triton`: nf4_matmul.py). `triton` (CUDA) also
fuses the gate: one kernel adds both LoRA updates into the gate and up base outputs and writes
h = act(g) * u (forward); one adds the down projection's drop'(du A) into dh and applies the
activation's backward, writing dgate and dup (backward). `torch` (CPU) composes torch ops with
packtune's gated-activation kernels (glu.py).

Dropout masks (one seed per linear, as PEFT draws one mask per layer) are regenerated in the
backward from their seeds, never stored.
"""

from __future__ import annotations

import torch

from packtune.kernels._dispatch import launch_device, register_op, resolve_backend, triton_interpreted
from packtune.kernels._triton import _dot, tl, triton
from packtune.kernels.glu import ACTIVATIONS, act_and_grad, glu_backward, glu_forward, glu_ref
from packtune.kernels.lora import (
    _BLOCK_COLS,
    _BLOCK_ROWS,
    _drop,
    _rank_block,
    check_dropout,
    lora_backward,
    lora_da,
    lora_down,
    lora_forward,
    lora_linear_ref,
)
from packtune.kernels.nf4_matmul import base_matmul, base_matmul_dx

__all__ = ["ACTIVATIONS", "LoRAMLPFunction", "lora_mlp", "lora_mlp_ref"]

register_op("lora_mlp", ("triton", "torch"))

LoRAWeights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]
"""(W, bias, A, B) of one LoRA linear."""

def lora_mlp_ref(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, scale: float,
                 dropout: float = 0.0, seeds: tuple[int, int, int] = (0, 0, 0), activation: str = "silu",
                 mask_backend: str = "torch") -> torch.Tensor:
    """The specification: a PEFT-wrapped LlamaMLP (GemmaMLP for gelu_tanh), down(act(gate(x)) * up(x))."""
    g = lora_linear_ref(x, *gate, scale, dropout, seeds[0], mask_backend)
    h = glu_ref(g, lora_linear_ref(x, *up, scale, dropout, seeds[1], mask_backend), activation)
    return lora_linear_ref(h, *down, scale, dropout, seeds[2], mask_backend)


@triton.jit
def _tile_update(U, B, rows, cols, ranks, n_rows, n_cols, rank, stride_b_col, stride_b_rank,
                 UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """U[rows, :r] @ B[cols, :r]^T as an fp32 [BLOCK_N, BLOCK_C] tile."""
    u = tl.load(U + rows[:, None] * rank + ranks[None, :],
                mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank),
                other=0.0)
    b_t = tl.load(B + cols[None, :] * stride_b_col + ranks[:, None] * stride_b_rank,
                  mask=(cols[None, :] < n_cols) & (ranks[:, None] < rank), other=0.0)
    return _dot(u, b_t, tl.zeros((BLOCK_N, BLOCK_C), tl.float32), UPCAST)


@triton.jit
def _lora_gate_kernel(G, U, H, UG, UU, BG, BU, n_rows, n_cols, rank, scale, R: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACTIVATION: tl.constexpr,
                      UPCAST: tl.constexpr):
    """g += s ug Bg^T, u += s uu Bu^T (in place: they are saved), h = act(g) * u."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    ranks = tl.arange(0, R)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]
    g = tl.load(G + offsets, mask=inside, other=0.0).to(tl.float32)
    g += scale * _tile_update(UG, BG, rows, cols, ranks, n_rows, n_cols, rank, rank, 1, UPCAST, BLOCK_N,
                              BLOCK_C)
    u = tl.load(U + offsets, mask=inside, other=0.0).to(tl.float32)
    u += scale * _tile_update(UU, BU, rows, cols, ranks, n_rows, n_cols, rank, rank, 1, UPCAST, BLOCK_N,
                              BLOCK_C)
    g = g.to(G.dtype.element_ty)  # h from the stored values, as the backward recomputes it
    u = u.to(U.dtype.element_ty)
    tl.store(G + offsets, g, mask=inside)
    tl.store(U + offsets, u, mask=inside)
    act, _ = act_and_grad(g.to(tl.float32), ACTIVATION)
    tl.store(H + offsets, (act * u.to(tl.float32)).to(H.dtype.element_ty), mask=inside)


@triton.jit
def _lora_act_grad_kernel(DH, DUP, G, U, DUD, AD, n_rows, n_cols, rank, seed, p, R: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr,
                          ACTIVATION: tl.constexpr, UPCAST: tl.constexpr):
    """dh = DH + drop'(dud Ad) (DH holds dy Wd); DH <- dgate = dh u act'(g), DUP <- dup = dh act(g)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    ranks = tl.arange(0, R)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]
    update = _tile_update(DUD, AD, rows, cols, ranks, n_rows, n_cols, rank, 1, n_cols, UPCAST, BLOCK_N,
                          BLOCK_C)
    if DROPOUT:
        update = _drop(update, seed, offsets, p)
    dh = tl.load(DH + offsets, mask=inside, other=0.0).to(tl.float32) + update
    g = tl.load(G + offsets, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=inside, other=0.0).to(tl.float32)
    act, act_grad = act_and_grad(g, ACTIVATION)
    tl.store(DH + offsets, (dh * u * act_grad).to(DH.dtype.element_ty), mask=inside)
    tl.store(DUP + offsets, (dh * act).to(DUP.dtype.element_ty), mask=inside)


def _tiles(n_rows: int, n_cols: int) -> tuple[int, int]:
    return (triton.cdiv(n_rows, _BLOCK_ROWS), triton.cdiv(n_cols, _BLOCK_COLS))


def _triton_gate(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, scale: float, p: float, seeds,
                 activation: str):
    """(g, u, h, ug, uu): the gate and up projections with their LoRA updates, and h = act(g) * u."""
    g, u = base_matmul(x, *gate[:2], "triton"), base_matmul(x, *up[:2], "triton")
    ug, uu = lora_down(x, gate[2], p, seeds[0]), lora_down(x, up[2], p, seeds[1])
    h = torch.empty_like(g)
    if g.numel():
        with launch_device(x):
            _lora_gate_kernel[_tiles(*g.shape)](g, u, h, ug, uu, gate[3].contiguous(), up[3].contiguous(),
                                                g.shape[0], g.shape[1], ug.shape[1], scale,
                                                R=_rank_block(ug.shape[1]), BLOCK_N=_BLOCK_ROWS,
                                                BLOCK_C=_BLOCK_COLS, ACTIVATION=activation,
                                                UPCAST=triton_interpreted())
    return g, u, h, ug, uu


def _triton_act_grad(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dud: torch.Tensor,
                     lora_a: torch.Tensor,
                     p: float, seed: int, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) from dh = dh_base + drop'(dud A) (dh_base overwritten with dgate)."""
    dup = torch.empty_like(u)
    if dh.numel():
        with launch_device(dh):
            _lora_act_grad_kernel[_tiles(*dh.shape)](dh, dup, g, u, dud, lora_a.contiguous(), dh.shape[0],
                                                     dh.shape[1], dud.shape[1], seed, p,
                                                     R=_rank_block(dud.shape[1]), BLOCK_N=_BLOCK_ROWS,
                                                     BLOCK_C=_BLOCK_COLS, DROPOUT=p > 0,
                                                     ACTIVATION=activation, UPCAST=triton_interpreted())
    return dh, dup


class LoRAMLPFunction(torch.autograd.Function):
    """Forward and backward of the LoRA MLP on [N, H] rows; gradients for x and the six A/B only."""

    @staticmethod
    def forward(ctx, x, wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d, scale, dropout, seeds, activation,
                backend):
        gate, up, down = (wg, bg, ag, b_g), (wu, bu, au, b_u), (wd, bd, ad, b_d)
        if backend == "triton":
            g, u, h, ug, uu = _triton_gate(x, gate, up, scale, dropout, seeds, activation)
        else:
            g, ug = lora_forward(x, gate, scale, dropout, seeds[0], backend)
            u, uu = lora_forward(x, up, scale, dropout, seeds[1], backend)
            h = glu_forward(g, u, activation)
        y, ud = lora_forward(h, down, scale, dropout, seeds[2], backend)
        del h
        ctx.save_for_backward(x, g, u, ug, uu, ud, wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d)
        ctx.scale, ctx.dropout, ctx.seeds = scale, dropout, seeds
        ctx.activation, ctx.backend = activation, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, u, ug, uu, ud, *weights = ctx.saved_tensors
        gate, up, down = tuple(weights[0:4]), tuple(weights[4:8]), tuple(weights[8:12])
        s, p, seeds, backend = ctx.scale, ctx.dropout, ctx.seeds, ctx.backend
        dy = dy.contiguous()
        h = glu_forward(g, u, ctx.activation)
        if backend == "triton":  # dB and dA of down as in lora_backward; its dx fused with act's backward
            dbd = (dy.t() @ ud).mul_(s).to(down[3].dtype)
            dud = (dy @ down[3].to(dy.dtype)).mul_(s)
            dad = lora_da(dud, h, p, seeds[2]).to(down[2].dtype)
            del h
            dh = base_matmul_dx(dy, down[0], backend)
            dg, du = _triton_act_grad(dh, g, u, dud, down[2], p, seeds[2], ctx.activation)
        else:
            dh, dad, dbd = lora_backward(dy, h, ud, down, s, p, seeds[2], backend)
            del h
            dg, du = glu_backward(dh, g, u, ctx.activation)
        del dh
        need_dx = ctx.needs_input_grad[0]
        dxg, dag, dbg = lora_backward(dg, x, ug, gate, s, p, seeds[0], backend, need_dx)
        dx, dau, dbu = lora_backward(du, x, uu, up, s, p, seeds[1], backend, need_dx, dx_into=dxg)
        frozen = (None, None)
        return (dx, *frozen, dag, dbg, *frozen, dau, dbu, *frozen, dad, dbd, None, None, None, None, None)


def lora_mlp(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, scale: float,
             dropout: float = 0.0, seeds: tuple[int, int, int] = (0, 0, 0), activation: str = "silu", *,
             backend: str | None = None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for x [..., H], each linear a LoRA linear given as (W, bias, A, B);
    `activation` "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    check_dropout("lora_mlp", dropout)
    if activation not in ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    backend = resolve_backend("lora_mlp", x.device, backend)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = LoRAMLPFunction.apply(x2, *gate, *up, *down, float(scale), float(dropout), tuple(map(int, seeds)),
                              activation, backend)
    return y.view(*x.shape[:-1], y.shape[-1])
