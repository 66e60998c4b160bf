"""Fused LoRA linear: y = x W^T + b + s * (drop(x) A^T) B^T, whose backward never forms dW or W + s B A.

Shapes: x [..., in], W [out, in] (frozen, any float dtype or a torchao NF4 tensor), A [r, in],
B [out, r], s the LoRA scale. With u = drop(x) A^T ([N, r], tiny) and g = dy:

    dB = s g^T u                 [out, r]
    du = s g B                   [N, r]
    dA = du^T drop(x)            [r, in]
    dx = g W + drop'(du A)       [N, in]   (drop' applies the same mask and 1 / (1 - p))

Forward saves x and u only (PEFT's eager lora.Linear also keeps the dropout output and the
separate base and LoRA outputs). The base weight gets no gradient: no [out, in] buffer is ever
allocated besides W itself (an NF4 W is dequantised in registers by nf4_matmul.py's kernels on
`triton`, per call elsewhere; never saved).

Backends (`lora_linear` op): the big GEMMs (x W^T, g W, g^T u, g B) are torch.matmul everywhere
(cuBLAS / BLAS run them at peak), but for x W^T and g W over an NF4 W on `triton`. `triton`
(CUDA) fuses the small parts around them: u = drop(x) A^T in one pass over x with the dropout
mask drawn inside the kernel (`tl.rand`), the update added into the base output tile
(`y += s u B^T`, no [N, out] temporary), dA = du^T drop(x) with the mask redrawn, and
dx += drop'(du A) in place. `torch` (CPU, and the fp64 reference path)
does the same with torch ops: `addmm_` in place, the mask a tensor drawn from a torch Generator.

Dropout (on the LoRA input only, as PEFT) draws its mask from a seed: the module passes a seed
taken from torch's CPU generator (seeded by the run, saved in checkpoints), and the backward
regenerates the same mask from it instead of storing it, so the mask costs no memory and a
resumed run draws the same masks as an uninterrupted one. The mask is a function of (seed,
backend): `dropout_mask(..., backend)` gives either one, so the references can use it.
`lora_linear_ref` is the specification (plain autograd, fp64 in the tests).
"""

from __future__ import annotations

import torch

from packtune.kernels._dispatch import launch_device, register_op, resolve_backend, triton_interpreted
from packtune.kernels._triton import _dot, tl, triton
from packtune.kernels.nf4_matmul import base_matmul, base_matmul_dx, dense_weight

__all__ = ["LoRALinearFunction", "dense_weight", "dropout_mask", "lora_linear", "lora_linear_ref"]

register_op("lora_linear", ("triton", "torch"))

_BLOCK_ROWS = 32
_BLOCK_COLS = 64


@triton.jit
def _drop(v, seed, offsets, p):
    """Inverted dropout of fp32 `v` from (seed, element offsets): the mask `dropout_mask` draws."""
    return tl.where(tl.rand(seed, offsets) >= p, v / (1.0 - p), 0.0)


@triton.jit
def _mask_kernel(M, n, seed, p, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ones = tl.full((BLOCK,), 1.0, tl.float32)
    tl.store(M + offsets, _drop(ones, seed, offsets, p).to(M.dtype.element_ty), mask=offsets < n)


@triton.jit
def _lora_down_kernel(X, A, U, n_rows, n_in, rank, stride_x, seed, p, R: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    """U[N, r] = drop(X)[N, in] @ A[r, in]^T, one program per BLOCK_N rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R)
    acc = tl.zeros((BLOCK_N, R), tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                    mask=(rows[:, None] < n_rows) & (cols[None, :] < n_in), other=0.0)
        if DROPOUT:
            x = _drop(x.to(tl.float32), seed, rows[:, None] * n_in + cols[None, :], p).to(X.dtype.element_ty)
        a_t = tl.load(A + ranks[None, :] * n_in + cols[:, None],
                      mask=(ranks[None, :] < rank) & (cols[:, None] < n_in), other=0.0)
        acc = _dot(x, a_t, acc, UPCAST)
    tl.store(U + rows[:, None] * rank + ranks[None, :], acc.to(U.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


@triton.jit
def _lora_up_kernel(Y, U, B, n_rows, n_cols, rank, stride_b_col, stride_b_rank, scale, seed, p,
                    R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr,
                    UPCAST: tl.constexpr):
    """Y[N, C] += drop'(scale * U[N, r] @ B[C, r]^T) in place, one program per output tile. The
    forward adds the update into y (no dropout here); the backward adds drop'(du A) into dx."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    ranks = tl.arange(0, R)
    u = tl.load(U + rows[:, None] * rank + ranks[None, :],
                mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank),
                other=0.0)
    b_t = tl.load(B + cols[None, :] * stride_b_col + ranks[:, None] * stride_b_rank,
                  mask=(cols[None, :] < n_cols) & (ranks[:, None] < rank), other=0.0)
    update = _dot(u, b_t, tl.zeros((BLOCK_N, BLOCK_C), tl.float32), UPCAST) * scale
    offsets = rows[:, None] * n_cols + cols[None, :]
    if DROPOUT:
        update = _drop(update, seed, offsets, p)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    y = tl.load(Y + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + offsets, (y + update).to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _lora_da_kernel(DU, X, DA, n_rows, n_in, rank, stride_x, seed, p, R: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    """DA[r, in] = DU[N, r]^T @ drop(X)[N, in] (fp32), one program per BLOCK_K columns, rows in order
    (deterministic: no atomics)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BLOCK_K), tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                    mask=(rows[:, None] < n_rows) & (cols[None, :] < n_in), other=0.0)
        if DROPOUT:
            x = _drop(x.to(tl.float32), seed, rows[:, None] * n_in + cols[None, :], p).to(X.dtype.element_ty)
        du_t = tl.load(DU + rows[None, :] * rank + ranks[:, None],
                       mask=(rows[None, :] < n_rows) & (ranks[:, None] < rank), other=0.0)
        acc = _dot(du_t, x, acc, UPCAST)
    tl.store(DA + ranks[:, None] * n_in + cols[None, :], acc,
             mask=(ranks[:, None] < rank) & (cols[None, :] < n_in))


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs every dimension >= 16


def lora_down(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """u = drop(x) A^T [N, r] in x's dtype (Triton)."""
    n, n_in = x.shape
    rank = lora_a.shape[0]
    u = torch.empty(n, rank, dtype=x.dtype, device=x.device)
    if n:
        with launch_device(x):
            _lora_down_kernel[(triton.cdiv(n, _BLOCK_ROWS),)](
                x, lora_a.contiguous(), u, n, n_in, rank, x.stride(0), seed, p, R=_rank_block(rank),
                BLOCK_N=_BLOCK_ROWS, BLOCK_K=_BLOCK_COLS, DROPOUT=p > 0, UPCAST=triton_interpreted())
    return u


def lora_up_add_(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scale: float, p: float = 0.0,
                 seed: int = 0
                 ) -> torch.Tensor:
    """y [N, C] += drop'(scale * u b^T) in place (Triton); u [N, r] contiguous, b [C, r] any strides."""
    n, n_cols = y.shape
    if y.numel():
        grid = (triton.cdiv(n, _BLOCK_ROWS), triton.cdiv(n_cols, _BLOCK_COLS))
        with launch_device(y):
            _lora_up_kernel[grid](y, u, b, n, n_cols, u.shape[1], b.stride(0), b.stride(1), scale, seed, p,
                                  R=_rank_block(u.shape[1]), BLOCK_N=_BLOCK_ROWS, BLOCK_C=_BLOCK_COLS,
                                  DROPOUT=p > 0, UPCAST=triton_interpreted())
    return y


def lora_da(du: torch.Tensor, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dA = du^T drop(x) [r, in] in fp32 (Triton)."""
    n, n_in = x.shape
    rank = du.shape[1]
    da = torch.zeros(rank, n_in, dtype=torch.float32, device=x.device)
    if da.numel():
        with launch_device(x):
            _lora_da_kernel[(triton.cdiv(n_in, _BLOCK_COLS),)](
                du, x, da, n, n_in, rank, x.stride(0), seed, p, R=_rank_block(rank), BLOCK_N=_BLOCK_ROWS,
                BLOCK_K=_BLOCK_COLS, DROPOUT=p > 0, UPCAST=triton_interpreted())
    return da


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype,
                 backend: str = "torch") -> torch.Tensor:
    """Inverted-dropout multiplier (0 or 1 / (1 - p)) drawn from `seed`: the same seed, the same mask.
    `backend` "triton" gives the mask the Triton kernels draw inside themselves (Philox over element
    offsets), "torch" the one the torch path draws from a torch Generator."""
    if backend == "triton":
        mask = torch.empty(shape, dtype=dtype, device=device)
        if mask.numel():
            with launch_device(mask):
                _mask_kernel[(triton.cdiv(mask.numel(), 1024),)](mask, mask.numel(), seed, p, BLOCK=1024)
        return mask
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


def _dropped(x: torch.Tensor, p: float, seed: int, backend: str = "torch") -> torch.Tensor:
    return x if p == 0.0 else x * dropout_mask(x.shape, p, seed, x.device, x.dtype, backend)


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float, dropout: float = 0.0, seed: int = 0,
                    mask_backend: str = "torch") -> torch.Tensor:
    """The specification: PEFT's lora.Linear forward (base output plus the scaled low-rank update),
    its dropout mask the one `mask_backend` draws from `seed`."""
    base = torch.nn.functional.linear(x, dense_weight(weight, x.dtype), bias)
    x2 = x.reshape(-1, x.shape[-1])
    update = _dropped(x2, dropout, seed, mask_backend) @ lora_a.to(x.dtype).t() @ lora_b.to(x.dtype).t()
    return base + scale * update.view(*x.shape[:-1], -1)


def lora_forward(x: torch.Tensor, lin: tuple, scale: float, p: float, seed: int, backend: str
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
                  seed: int, backend: str, need_dx: bool = True, need_da: bool = True, need_db: bool = True,
                  dx_into: torch.Tensor | None = None):
    """(dx, dA, dB) of one LoRA linear from its output gradient dy [N, out] (None where not needed).
    `dx_into` (the gradient of another linear over the same x) receives dx in place: the GEMM
    accumulates into it (BLAS's beta = 1), no [N, in] temporary and no extra add."""
    weight, _, lora_a, lora_b = lin
    dtype = dy.dtype

    db = (dy.t() @ u).mul_(scale).to(lora_b.dtype) if need_db else None
    du = (dy @ lora_b.to(dtype)).mul_(scale)
    if backend == "triton":
        da = lora_da(du, x, p, seed).to(lora_a.dtype) if need_da else None
        dx = None
        if need_dx:
            dx = lora_up_add_(base_matmul_dx(dy, weight, backend, dx_into), du, lora_a.t(), 1.0, p, seed)
        return dx, da, db
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
                lora_b: torch.Tensor, scale: float, dropout: float, seed: int, backend: str) -> torch.Tensor:
        y, u = lora_forward(x, (weight, bias, lora_a, lora_b), scale, dropout, seed, backend)
        ctx.save_for_backward(x, weight, lora_a, lora_b, u)
        ctx.scale, ctx.dropout, ctx.seed, ctx.backend = scale, dropout, seed, backend
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, lora_a, lora_b, u = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, da, db = lora_backward(dy.contiguous(), x, u, (weight, None, lora_a, lora_b), ctx.scale,
                                   ctx.dropout,
                                   ctx.seed, ctx.backend, need[0], need[3], need[4])
        return dx, None, None, da, db, None, None, None, None


def check_dropout(op: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{op}: dropout must be in [0, 1), got {dropout}")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout: float = 0.0, seed: int = 0, *,
                backend: str | None = None) -> torch.Tensor:
    """y = x W^T + bias + scale * (drop(x) A^T) B^T for x [..., in]; computes in x's dtype.

    `dropout` (0 <= p < 1) applies to the LoRA branch's input only, its mask drawn from `seed`
    (`dropout_mask(..., backend)` is that mask).
    """
    check_dropout("lora_linear", dropout)
    backend = resolve_backend("lora_linear", x.device, backend)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.stride(0) != x2.shape[1]:
        x2 = x2.contiguous()
    y = LoRALinearFunction.apply(x2, weight, bias, lora_a, lora_b, float(scale), float(dropout), int(seed),
                                 backend)
    return y.view(*x.shape[:-1], y.shape[-1])
