"""Fused LoRA linear: y = x W^T + b + s * (drop(x) A^T) B^T, whose backward never forms dW or W + s B A.

Shapes: x [..., in], W [out, in] (frozen, any float dtype or a torchao NF4 tensor), A [r, in],
B [out, r], s the LoRA scale. With u = drop(x) A^T ([N, r], tiny) and g = dy:

    dB = s g^T u                 [out, r]
    du = s g B                   [N, r]
    dA = du^T drop(x)            [r, in]
    dx = g W + drop'(du A)       [N, in]   (drop' applies the same mask and 1 / (1 - p))

Forward saves x and u only (PEFT's eager lora.Linear also keeps the dropout output and the
separate base and LoRA outputs). The base weight gets no gradient and no [out, in] gradient buffer
(an NF4 W goes through nf4_matmul.py's GEMMs on `triton`: dequantised in registers, or into a
per-call scratch for cuBLAS where that measured faster; dequantised per call elsewhere; never saved).

Backends (`lora_linear` op): the big GEMMs (x W^T, g W, g^T u, g B) are torch.matmul everywhere
(cuBLAS / BLAS run them at peak), but for x W^T and g W over an NF4 W on `triton`. `triton`
(CUDA) fuses the small parts around them: u = drop(x) A^T in one pass over x with the dropout
mask drawn inside the kernel, the update added into the base output tile (`y += s u B^T`, no
[N, out] temporary), and in the backward one kernel that draws the mask once per tile for both
dA = du^T drop(x) and dx += drop'(du A) (in place). dA is reduced over N in row splits that fill
the GPU, their partial sums added in a fixed order afterwards: run-to-run identical, no atomics.
Ranks are tiled by 64 (`rank_tile`): a rank-256 adapter's accumulators stay in registers. `torch`
(CPU, and the fp64 reference path) does the same with torch ops: `addmm_` in place.

Dropout (on the LoRA input only, as PEFT) is kernels/dropout.py's counter-based mask: a function
of a seed (an int64 tensor on the device, drawn by the module), regenerated in the backward
instead of stored, the same mask on every backend. `lora_linear_ref` is the specification (plain
autograd, fp64 in the tests).
"""

from __future__ import annotations

import torch

from packtune.kernels._dispatch import (
    launch_device,
    register_op,
    resolve_backend,
    sm_count,
    triton_interpreted,
)
from packtune.kernels._triton import _dot, tl, triton
from packtune.kernels.dropout import apply_dropout, dropout_mask, keep_threshold, keep_tile, seed_tensor
from packtune.kernels.nf4_matmul import base_matmul, base_matmul_dx, dense_weight

__all__ = ["LoRALinearFunction", "dense_weight", "dropout_mask", "lora_linear", "lora_linear_ref"]

register_op("lora_linear", ("triton", "torch"))

_BLOCK_ROWS = 32
_BLOCK_COLS = 64
_RANK_TILE = 64
"""Ranks per program (the down projection, dA) or per step (the rank contractions): a rank-256
adapter's dA accumulators stay a [64, 64] fp32 tile per program, in registers."""


@triton.jit
def rank_product(U, V, rows, cols, n_rows, n_cols, rank, stride_v_col, stride_v_rank, R_TILE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """U[rows, :rank] @ V[cols, :rank]^T as an fp32 [BLOCK_N, BLOCK_C] tile, R_TILE ranks per step
    (U [N, rank] contiguous, V any strides)."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for r0 in range(0, rank, R_TILE):
        ranks = r0 + tl.arange(0, R_TILE)
        u = tl.load(U + rows[:, None] * rank + ranks[None, :],
                    mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank), other=0.0)
        v_t = tl.load(V + cols[None, :] * stride_v_col + ranks[:, None] * stride_v_rank,
                      mask=(cols[None, :] < n_cols) & (ranks[:, None] < rank), other=0.0)
        acc = _dot(u, v_t, acc, UPCAST)
    return acc


@triton.jit
def _lora_down_kernel(X, A, U, SEED, n_rows, n_in, rank, stride_x, threshold, p, R_TILE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr,
                      UPCAST: tl.constexpr):
    """U[N, r] = drop(X)[N, in] @ A[r, in]^T, one program per (BLOCK_N rows, R_TILE ranks)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.program_id(1) * R_TILE + tl.arange(0, R_TILE)
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_N, R_TILE), tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                    mask=(rows[:, None] < n_rows) & (cols[None, :] < n_in), other=0.0)
        if DROPOUT:
            keep = keep_tile(seed, rows, k0, n_in, threshold, BLOCK_N, BLOCK_K)
            x = apply_dropout(x.to(tl.float32), keep, p).to(X.dtype.element_ty)
        a_t = tl.load(A + ranks[None, :] * n_in + cols[:, None],
                      mask=(ranks[None, :] < rank) & (cols[:, None] < n_in), other=0.0)
        acc = _dot(x, a_t, acc, UPCAST)
    tl.store(U + rows[:, None] * rank + ranks[None, :], acc.to(U.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


@triton.jit
def _lora_up_kernel(Y, U, B, n_rows, n_cols, rank, stride_b_col, stride_b_rank, scale, R_TILE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """Y[N, C] += scale * U[N, r] @ B[C, r]^T in place, one program per output tile."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    update = rank_product(U, B, rows, cols, n_rows, n_cols, rank, stride_b_col, stride_b_rank, R_TILE,
                          BLOCK_N, BLOCK_C, UPCAST) * scale
    offsets = rows[:, None] * n_cols + cols[None, :]
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    y = tl.load(Y + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + offsets, (y + update).to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _lora_da_dx_kernel(DU, X, A, DA, DX, SEED, n_rows, n_in, rank, stride_x, rows_per_split, threshold, p,
                       R_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DROPOUT: tl.constexpr, WRITE_DX: tl.constexpr, UPCAST: tl.constexpr):
    """One split of the rows, one column tile, one rank tile: DA[split, ranks, cols] = DU[rows, ranks]^T
    @ drop(X)[rows, cols] (fp32, rows in order: summed over the splits afterwards, deterministic),
    and in the rank tile 0 programs DX[rows, cols] += drop'(DU[rows] @ A[:, cols]) in place. Both
    apply one mask, drawn once per tile."""
    col0 = tl.program_id(0) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K).to(tl.int64)
    ranks = tl.program_id(1) * R_TILE + tl.arange(0, R_TILE)
    split = tl.program_id(2).to(tl.int64)
    row_end = tl.minimum(split * rows_per_split + rows_per_split, n_rows)
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((R_TILE, BLOCK_K), tl.float32)
    for i in range(0, rows_per_split, BLOCK_N):
        rows = split * rows_per_split + i + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < row_end) & (cols[None, :] < n_in)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
        if DROPOUT:
            keep = keep_tile(seed, rows, col0, n_in, threshold, BLOCK_N, BLOCK_K)
            x = apply_dropout(x.to(tl.float32), keep, p).to(X.dtype.element_ty)
        du_t = tl.load(DU + rows[None, :] * rank + ranks[:, None],
                       mask=(rows[None, :] < row_end) & (ranks[:, None] < rank), other=0.0)
        acc = _dot(du_t, x, acc, UPCAST)
        if WRITE_DX:
            if tl.program_id(1) == 0:
                update = rank_product(DU, A, rows, cols, row_end, n_in, rank, 1, n_in, R_TILE, BLOCK_N,
                                      BLOCK_K, UPCAST)
                if DROPOUT:
                    update = apply_dropout(update, keep, p)
                offsets = rows[:, None] * n_in + cols[None, :]
                dx = tl.load(DX + offsets, mask=inside, other=0.0).to(tl.float32)
                tl.store(DX + offsets, (dx + update).to(DX.dtype.element_ty), mask=inside)
    tl.store(DA + split * rank * n_in + ranks[:, None] * n_in + cols[None, :], acc,
             mask=(ranks[:, None] < rank) & (cols[None, :] < n_in))


def rank_tile(rank: int) -> int:
    """Ranks per program or step: a power of two >= 16 (tl.dot's smallest), at most _RANK_TILE."""
    return min(_RANK_TILE, max(16, triton.next_power_of_2(rank)))


def split_rows(device: torch.device, n_rows: int, programs: int) -> tuple[int, int]:
    """(rows per split, splits) of a reduction over N rows: enough splits for about four programs
    per SM beside the `programs` of the other grid axes (two under the interpreter, to run the sum);
    whole row tiles each, none empty."""
    row_tiles = triton.cdiv(n_rows, _BLOCK_ROWS)
    wanted = min(2, row_tiles) if device.type != "cuda" else triton.cdiv(4 * sm_count(device), programs)
    rows_per_split = max(1, triton.cdiv(row_tiles, max(1, min(row_tiles, wanted)))) * _BLOCK_ROWS
    return rows_per_split, max(1, triton.cdiv(n_rows, rows_per_split))


def lora_down(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """u = drop(x) A^T [N, r] in x's dtype (Triton)."""
    n, n_in = x.shape
    rank = lora_a.shape[0]
    u = torch.empty(n, rank, dtype=x.dtype, device=x.device)
    if n:
        r_tile = rank_tile(rank)
        with launch_device(x):
            _lora_down_kernel[(triton.cdiv(n, _BLOCK_ROWS), triton.cdiv(rank, r_tile))](
                x, lora_a.contiguous(), u, x if seed is None else seed, n, n_in, rank, x.stride(0),
                keep_threshold(p), p, R_TILE=r_tile, BLOCK_N=_BLOCK_ROWS, BLOCK_K=_BLOCK_COLS, DROPOUT=p > 0,
                UPCAST=triton_interpreted())
    return u


def lora_up_add_(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """y [N, C] += scale * u b^T in place (Triton); u [N, r] contiguous, b [C, r] any strides."""
    n, n_cols = y.shape
    if y.numel():
        grid = (triton.cdiv(n, _BLOCK_ROWS), triton.cdiv(n_cols, _BLOCK_COLS))
        with launch_device(y):
            _lora_up_kernel[grid](y, u, b, n, n_cols, u.shape[1], b.stride(0), b.stride(1), scale,
                                  R_TILE=rank_tile(u.shape[1]), BLOCK_N=_BLOCK_ROWS, BLOCK_C=_BLOCK_COLS,
                                  UPCAST=triton_interpreted())
    return y


def lora_da_dx_(du: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: torch.Tensor | None,
                dx: torch.Tensor | None = None) -> torch.Tensor:
    """dA = du^T drop(x) [r, in] in fp32, and dx [N, in] += drop'(du A) in place when `dx` is given
    (Triton; one mask draw for both). dA is summed over row splits in a fixed order: deterministic."""
    n, n_in = x.shape
    rank = du.shape[1]
    r_tile = rank_tile(rank)
    col_tiles, rank_tiles = triton.cdiv(n_in, _BLOCK_COLS), triton.cdiv(rank, r_tile)
    rows_per_split, splits = split_rows(x.device, n, col_tiles * rank_tiles)
    partial = torch.empty(splits, rank, n_in, dtype=torch.float32, device=x.device)
    if partial.numel():
        with launch_device(x):
            _lora_da_dx_kernel[(col_tiles, rank_tiles, splits)](
                du, x, lora_a.contiguous(), partial, partial if dx is None else dx,
                x if seed is None else seed, n, n_in, rank, x.stride(0), rows_per_split, keep_threshold(p), p,
                R_TILE=r_tile, BLOCK_N=_BLOCK_ROWS, BLOCK_K=_BLOCK_COLS, DROPOUT=p > 0,
                WRITE_DX=dx is not None, UPCAST=triton_interpreted())
    return partial[0] if splits == 1 else partial.sum(0)


def _dropped(x: torch.Tensor, p: float, seed: torch.Tensor | None) -> torch.Tensor:
    return x if p == 0.0 else x * dropout_mask(x.shape, p, seed, x.device, x.dtype)


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float, dropout: float = 0.0,
                    seed: torch.Tensor | int = 0) -> torch.Tensor:
    """The specification: PEFT's lora.Linear forward (base output plus the scaled low-rank update),
    its dropout mask `dropout_mask(..., seed)`, the one the kernels draw."""
    base = torch.nn.functional.linear(x, dense_weight(weight, x.dtype), bias)
    x2 = x.reshape(-1, x.shape[-1])
    update = _dropped(x2, dropout, seed) @ lora_a.to(x.dtype).t() @ lora_b.to(x.dtype).t()
    return base + scale * update.view(*x.shape[:-1], -1)


def lora_forward(x: torch.Tensor, lin: tuple, scale: float, p: float, seed: torch.Tensor | None, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + b + s u B^T, u) with u = drop(x) A^T, for x [N, in] contiguous rows."""
    weight, bias, lora_a, lora_b = lin
    y = base_matmul(x, weight, bias, backend)
    if backend == "triton":
        u = lora_down(x, lora_a, p, seed)
        return lora_up_add_(y, u, lora_b, scale), u
    u = _dropped(x, p, seed) @ lora_a.to(x.dtype).t()
    return y.addmm_(u, lora_b.to(x.dtype).t(), alpha=scale), u


def lora_backward(dy: torch.Tensor, x: torch.Tensor, u: torch.Tensor, lin: tuple, scale: float, p: float,
                  seed: torch.Tensor | None, backend: str, need_dx: bool = True, need_da: bool = True,
                  need_db: bool = True, dx_into: torch.Tensor | None = None):
    """(dx, dA, dB) of one LoRA linear from its output gradient dy [N, out] (None where not needed).
    `dx_into` (the gradient of another linear over the same x) receives dx in place: the GEMM
    accumulates into it (BLAS's beta = 1), no [N, in] temporary and no extra add."""
    weight, _, lora_a, lora_b = lin
    dtype = dy.dtype

    db = (dy.t() @ u).mul_(scale).to(lora_b.dtype) if need_db else None
    du = (dy @ lora_b.to(dtype)).mul_(scale)
    if backend == "triton":
        dx = base_matmul_dx(dy, weight, backend, dx_into) if need_dx else None
        da = lora_da_dx_(du, x, lora_a, p, seed, dx) if need_da or need_dx else None
        return dx, da.to(lora_a.dtype) if need_da else None, db
    mask = dropout_mask(x.shape, p, seed, x.device, dtype) if p else None
    da = (du.t() @ (x if mask is None else x * mask)).to(lora_a.dtype) if need_da else None
    dx = None
    if need_dx:
        dx = base_matmul_dx(dy, weight, backend, dx_into)
        if mask is None:
            dx.addmm_(du, lora_a.to(dtype))  # in place: no [N, in] temporary
        else:
            dx += (du @ lora_a.to(dtype)).mul_(mask)
    return dx, da, db


class LoRALinearFunction(torch.autograd.Function):
    """Forward and backward of one LoRA linear on [N, in] rows; no gradient for W and the bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout: float, seed: torch.Tensor | None,
                backend: str) -> torch.Tensor:
        y, u = lora_forward(x, (weight, bias, lora_a, lora_b), scale, dropout, seed, backend)
        ctx.save_for_backward(x, weight, lora_a, lora_b, u, seed)
        ctx.scale, ctx.dropout, ctx.backend = scale, dropout, backend
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, lora_a, lora_b, u, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, da, db = lora_backward(dy.contiguous(), x, u, (weight, None, lora_a, lora_b), ctx.scale,
                                   ctx.dropout, seed, ctx.backend, need[0], need[3], need[4])
        return dx, None, None, da, db, None, None, None, None


def check_dropout(op: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{op}: dropout must be in [0, 1), got {dropout}")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout: float = 0.0, seed: torch.Tensor | int = 0, *,
                backend: str | None = None) -> torch.Tensor:
    """y = x W^T + bias + scale * (drop(x) A^T) B^T for x [..., in]; computes in x's dtype.

    `dropout` (0 <= p < 1) applies to the LoRA branch's input only, its mask drawn from `seed` (an
    int64 tensor on x's device, `dropout.draw_seed`, or a host int; `dropout_mask` is that mask).
    """
    check_dropout("lora_linear", dropout)
    backend = resolve_backend("lora_linear", x.device, backend)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.stride(0) != x2.shape[1]:
        x2 = x2.contiguous()
    seed = seed_tensor(seed, x.device) if dropout else None
    y = LoRALinearFunction.apply(x2, weight, bias, lora_a, lora_b, float(scale), float(dropout), seed,
                                 backend)
    return y.view(*x.shape[:-1], y.shape[-1])
