"""BLOOM's GELU: the tanh approximation with Megatron's rounded constants, forward and backward.

transformers' `bloom_gelu_forward` / `bloom_gelu_back` (modeling_bloom.py) are the specification,
constants included: they differ from torch's `approximate="tanh"` (sqrt(2 / pi) = 0.7978845608...)
by ~1e-9 relative, visible in a float64 comparison. With t = tanh(C * x * (1 + A * x^2)):

    y  = x * 0.5 * (1 + t)
    dx = dy * (0.5 * x * (1 - t^2) * (C + D * x^2) + 0.5 * (1 + t))

C = 0.79788456, A = 0.044715 and D = 0.1070322243 (transformers' rounding of 3 * A * C). Forward
saves x only; backward recomputes t. Triton on CUDA (fp32 math); everywhere else the same formulas
as composed torch ops in the input dtype (a pointwise op: torch's own CPU kernels are the C++ path).
"""

from __future__ import annotations

import torch

from packtune.kernels._dispatch import launch_device, register_op, resolve_backend
from packtune.kernels._triton import tl, triton

register_op("bloom_gelu", ("triton", "torch"))

_BLOCK = 1024
C = 0.79788456
A = 0.044715
D = 0.1070322243


def bloom_gelu_ref(x: torch.Tensor) -> torch.Tensor:
    """transformers' `bloom_gelu_forward`, in the input dtype."""
    return x * 0.5 * (1.0 + torch.tanh(C * x * (1 + A * x * x)))


@triton.jit
def _tanh(u):
    # overflow-free: tanh(|u|) = (1 - e) / (1 + e) with e = exp(-2|u|)
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


def bloom_gelu_grad_ref(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """transformers' `bloom_gelu_back`, in the input dtype."""
    t = torch.tanh(C * x * (1 + A * x * x))
    return dy * (0.5 * x * ((1 - t * t) * (C + D * x * x)) + 0.5 * (1 + t))


@triton.jit
def _bloom_gelu_fwd_kernel(X, Y, n, C: tl.constexpr, A: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(C * x * (1.0 + A * x * x))
    tl.store(Y + offs, (x * 0.5 * (1.0 + t)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bloom_gelu_bwd_kernel(DY, X, DX, n, C: tl.constexpr, A: tl.constexpr, D: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(C * x * (1.0 + A * x * x))
    dx = dy * (0.5 * x * ((1.0 - t * t) * (C + D * x * x)) + 0.5 * (1.0 + t))
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _triton_forward(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    if x.numel():
        with launch_device(x):
            _bloom_gelu_fwd_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, y, x.numel(), C=C, A=A, BLOCK=_BLOCK)
    return y


def _triton_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dx = torch.empty_like(x)
    if x.numel():
        with launch_device(x):
            _bloom_gelu_bwd_kernel[(triton.cdiv(x.numel(), _BLOCK),)](dy, x, dx, x.numel(), C=C, A=A, D=D,
                                                                      BLOCK=_BLOCK)
    return dx


class BloomGeluFunction(torch.autograd.Function):
    """Saves the input only (as transformers' GeLUFunction); `backend` is "triton" or "torch"."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, backend: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.backend = backend
        return _triton_forward(x) if backend == "triton" else bloom_gelu_ref(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        if ctx.backend == "triton":
            return _triton_backward(dy.contiguous(), x), None
        return bloom_gelu_grad_ref(dy, x), None


def bloom_gelu(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """BLOOM's GELU of `x` (any shape), with transformers' backward formula."""
    backend = resolve_backend("bloom_gelu", x.device, backend)
    if backend == "triton":
        x = x.contiguous()
    return BloomGeluFunction.apply(x, backend)
