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
activation's backward, writing dgate and dup, and dA of the down projection (backward).
`torch` (CPU) composes torch ops with packtune's gated-activation kernels (glu.py).

Dropout masks (one seed per linear, as PEFT draws one mask per layer; kernels/dropout.py) are
regenerated in the backward from their seeds, never stored. The backward of the down projection
is one kernel with the activation's: it recomputes h = act(g) * u from the stored g and u, draws
the down projection's mask once per tile, and writes dA_down's partial sums (reduced over N in
row splits, summed in a fixed order: deterministic) beside dgate and dup, so h is never written
back to memory in the backward.
"""

from __future__ import annotations

import torch

from packtune.kernels._dispatch import launch_device, register_op, resolve_backend, triton_interpreted
from packtune.kernels._triton import _dot, tl, triton
from packtune.kernels.dropout import apply_dropout, keep_threshold, keep_tile, seed_tensor
from packtune.kernels.glu import ACTIVATIONS, act_and_grad, glu_backward, glu_forward, glu_ref
from packtune.kernels.lora import (
    _BLOCK_COLS,
    _BLOCK_ROWS,
    check_dropout,
    lora_backward,
    lora_down,
    lora_forward,
    lora_linear_ref,
    rank_product,
    rank_tile,
    split_rows,
)
from packtune.kernels.nf4_matmul import base_matmul, base_matmul_dx

__all__ = ["ACTIVATIONS", "LoRAMLPFunction", "lora_mlp", "lora_mlp_ref"]

register_op("lora_mlp", ("triton", "torch"))

LoRAWeights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]
"""(W, bias, A, B) of one LoRA linear."""

def lora_mlp_ref(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, scale: float,
                 dropout: float = 0.0, seeds: torch.Tensor | tuple[int, int, int] = (0, 0, 0),
                 activation: str = "silu") -> torch.Tensor:
    """The specification: a PEFT-wrapped LlamaMLP (GemmaMLP for gelu_tanh), down(act(gate(x)) * up(x))."""
    g = lora_linear_ref(x, *gate, scale, dropout, seeds[0])
    h = glu_ref(g, lora_linear_ref(x, *up, scale, dropout, seeds[1]), activation)
    return lora_linear_ref(h, *down, scale, dropout, seeds[2])


@triton.jit
def _lora_gate_kernel(G, U, H, UG, UU, BG, BU, n_rows, n_cols, rank, scale, R_TILE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACTIVATION: tl.constexpr,
                      UPCAST: tl.constexpr):
    """g += s ug Bg^T, u += s uu Bu^T (in place: they are saved), h = act(g) * u."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]
    g = tl.load(G + offsets, mask=inside, other=0.0).to(tl.float32)
    g += scale * rank_product(UG, BG, rows, cols, n_rows, n_cols, rank, rank, 1, R_TILE, BLOCK_N, BLOCK_C,
                              UPCAST)
    u = tl.load(U + offsets, mask=inside, other=0.0).to(tl.float32)
    u += scale * rank_product(UU, BU, rows, cols, n_rows, n_cols, rank, rank, 1, R_TILE, BLOCK_N, BLOCK_C,
                              UPCAST)
    g = g.to(G.dtype.element_ty)  # h from the stored values, as the backward recomputes it
    u = u.to(U.dtype.element_ty)
    tl.store(G + offsets, g, mask=inside)
    tl.store(U + offsets, u, mask=inside)
    act, _ = act_and_grad(g.to(tl.float32), ACTIVATION)
    tl.store(H + offsets, (act * u.to(tl.float32)).to(H.dtype.element_ty), mask=inside)


@triton.jit
def _lora_act_grad_kernel(DH, DUP, G, U, DUD, AD, DA, SEED, n_rows, n_cols, rank, rows_per_split, threshold,
                          p, R_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                          DROPOUT: tl.constexpr, ACTIVATION: tl.constexpr, UPCAST: tl.constexpr):
    """One split of the rows, one column tile, one rank tile of the down projection's and the
    activation's backward, h = act(g) * u recomputed as the forward stored it: DA[split, ranks, cols]
    = dud[rows, ranks]^T @ drop(h)[rows, cols] (fp32, summed over the splits afterwards), and in the
    rank tile 0 programs dh = DH + drop'(dud Ad), DH <- dgate = dh u act'(g), DUP <- dup = dh act(g).
    One mask draw per tile serves dA and dh."""
    col0 = tl.program_id(0) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C).to(tl.int64)
    ranks = tl.program_id(1) * R_TILE + tl.arange(0, R_TILE)
    split = tl.program_id(2).to(tl.int64)
    row_end = tl.minimum(split * rows_per_split + rows_per_split, n_rows)
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((R_TILE, BLOCK_C), tl.float32)
    for i in range(0, rows_per_split, BLOCK_N):
        rows = split * rows_per_split + i + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < row_end) & (cols[None, :] < n_cols)
        offsets = rows[:, None] * n_cols + cols[None, :]
        g = tl.load(G + offsets, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(U + offsets, mask=inside, other=0.0).to(tl.float32)
        act, act_grad = act_and_grad(g, ACTIVATION)
        h = (act * u).to(G.dtype.element_ty)
        if DROPOUT:
            keep = keep_tile(seed, rows, col0, n_cols, threshold, BLOCK_N, BLOCK_C)
            h = apply_dropout(h.to(tl.float32), keep, p).to(G.dtype.element_ty)
        dud_t = tl.load(DUD + rows[None, :] * rank + ranks[:, None],
                        mask=(rows[None, :] < row_end) & (ranks[:, None] < rank), other=0.0)
        acc = _dot(dud_t, h, acc, UPCAST)
        if tl.program_id(1) == 0:
            update = rank_product(DUD, AD, rows, cols, row_end, n_cols, rank, 1, n_cols, R_TILE, BLOCK_N,
                                  BLOCK_C, UPCAST)
            if DROPOUT:
                update = apply_dropout(update, keep, p)
            dh = tl.load(DH + offsets, mask=inside, other=0.0).to(tl.float32) + update
            tl.store(DH + offsets, (dh * u * act_grad).to(DH.dtype.element_ty), mask=inside)
            tl.store(DUP + offsets, (dh * act).to(DUP.dtype.element_ty), mask=inside)
    tl.store(DA + split * rank * n_cols + ranks[:, None] * n_cols + cols[None, :], acc,
             mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols))


def _triton_gate(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, scale: float, p: float,
                 seeds: torch.Tensor | None, activation: str):
    """(g, u, h, ug, uu): the gate and up projections with their LoRA updates, and h = act(g) * u."""
    g, u = base_matmul(x, *gate[:2], "triton"), base_matmul(x, *up[:2], "triton")
    ug = lora_down(x, gate[2], p, None if seeds is None else seeds[0])
    uu = lora_down(x, up[2], p, None if seeds is None else seeds[1])
    h = torch.empty_like(g)
    if g.numel():
        grid = (triton.cdiv(g.shape[0], _BLOCK_ROWS), triton.cdiv(g.shape[1], _BLOCK_COLS))
        with launch_device(x):
            _lora_gate_kernel[grid](g, u, h, ug, uu, gate[3].contiguous(), up[3].contiguous(), g.shape[0],
                                    g.shape[1], ug.shape[1], scale, R_TILE=rank_tile(ug.shape[1]),
                                    BLOCK_N=_BLOCK_ROWS, BLOCK_C=_BLOCK_COLS, ACTIVATION=activation,
                                    UPCAST=triton_interpreted())
    return g, u, h, ug, uu


def _triton_act_grad(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dud: torch.Tensor,
                     lora_a: torch.Tensor, p: float, seed: torch.Tensor | None, activation: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dA of the down projection in fp32, dgate, dup) from dh = dh_base + drop'(dud A) (dh_base
    overwritten with dgate)."""
    n, n_cols = dh.shape
    rank = dud.shape[1]
    r_tile = rank_tile(rank)
    col_tiles, rank_tiles = triton.cdiv(n_cols, _BLOCK_COLS), triton.cdiv(rank, r_tile)
    rows_per_split, splits = split_rows(dh.device, n, col_tiles * rank_tiles)
    partial = torch.empty(splits, rank, n_cols, dtype=torch.float32, device=dh.device)
    dup = torch.empty_like(u)
    if partial.numel():
        with launch_device(dh):
            _lora_act_grad_kernel[(col_tiles, rank_tiles, splits)](
                dh, dup, g, u, dud, lora_a.contiguous(), partial, dh if seed is None else seed, n, n_cols,
                rank,
                rows_per_split, keep_threshold(p), p, R_TILE=r_tile, BLOCK_N=_BLOCK_ROWS, BLOCK_C=_BLOCK_COLS,
                DROPOUT=p > 0, ACTIVATION=activation, UPCAST=triton_interpreted())
    return partial[0] if splits == 1 else partial.sum(0), dh, dup


def _seed(seeds: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if seeds is None else seeds[i]


class LoRAMLPFunction(torch.autograd.Function):
    """Forward and backward of the LoRA MLP on [N, H] rows; gradients for x and the six A/B only."""

    @staticmethod
    def forward(ctx, x, wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d, scale, dropout, seeds, activation,
                backend):
        gate, up, down = (wg, bg, ag, b_g), (wu, bu, au, b_u), (wd, bd, ad, b_d)
        if backend == "triton":
            g, u, h, ug, uu = _triton_gate(x, gate, up, scale, dropout, seeds, activation)
        else:
            g, ug = lora_forward(x, gate, scale, dropout, _seed(seeds, 0), backend)
            u, uu = lora_forward(x, up, scale, dropout, _seed(seeds, 1), backend)
            h = glu_forward(g, u, activation)
        y, ud = lora_forward(h, down, scale, dropout, _seed(seeds, 2), backend)
        del h
        ctx.save_for_backward(x, g, u, ug, uu, ud, seeds, wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d)
        ctx.scale, ctx.dropout = scale, dropout
        ctx.activation, ctx.backend = activation, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, u, ug, uu, ud, seeds, *weights = ctx.saved_tensors
        gate, up, down = tuple(weights[0:4]), tuple(weights[4:8]), tuple(weights[8:12])
        s, p, backend = ctx.scale, ctx.dropout, ctx.backend
        dy = dy.contiguous()
        dbd = (dy.t() @ ud).mul_(s).to(down[3].dtype)
        if backend == "triton":  # the down projection's dA and dx fused with the activation's backward
            dud = (dy @ down[3].to(dy.dtype)).mul_(s)
            dh = base_matmul_dx(dy, down[0], backend)
            dad, dg, du = _triton_act_grad(dh, g, u, dud, down[2], p, _seed(seeds, 2), ctx.activation)
            dad = dad.to(down[2].dtype)
        else:
            h = glu_forward(g, u, ctx.activation)
            dh, dad, _ = lora_backward(dy, h, ud, down, s, p, _seed(seeds, 2), backend, need_db=False)
            del h
            dg, du = glu_backward(dh, g, u, ctx.activation)
        del dh
        need_dx = ctx.needs_input_grad[0]
        dxg, dag, dbg = lora_backward(dg, x, ug, gate, s, p, _seed(seeds, 0), backend, need_dx)
        dx, dau, dbu = lora_backward(du, x, uu, up, s, p, _seed(seeds, 1), backend, need_dx, dx_into=dxg)
        frozen = (None, None)
        return (dx, *frozen, dag, dbg, *frozen, dau, dbu, *frozen, dad, dbd, None, None, None, None, None)


def lora_mlp(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, scale: float,
             dropout: float = 0.0, seeds: torch.Tensor | tuple[int, int, int] = (0, 0, 0),
             activation: str = "silu", *, backend: str | None = None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for x [..., H], each linear a LoRA linear given as (W, bias, A, B);
    `activation` "silu" (SwiGLU) or "gelu_tanh" (GeGLU); `seeds`: the three linears' dropout seeds
    (an int64 tensor [3] on x's device, `dropout.draw_seed(device, 3)`, or host ints)."""
    check_dropout("lora_mlp", dropout)
    if activation not in ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    backend = resolve_backend("lora_mlp", x.device, backend)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    seeds = seed_tensor(seeds, x.device) if dropout else None
    y = LoRAMLPFunction.apply(x2, *gate, *up, *down, float(scale), float(dropout), seeds, activation, backend)
    return y.view(*x.shape[:-1], y.shape[-1])
