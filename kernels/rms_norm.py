"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + weight), statistics in fp32 for any input dtype.

`offset` is 0 for Llama-style norms and 1 for Gemma's, which store the scale as `weight` = scale - 1
(initialised to zero); the kernels add it as they load the weight, so no shifted copy is made.
Per-head q/k norms (Qwen3, Gemma 3) are the same op over the last dimension of a `[..., H, D]`
view of the projection output: its rows are contiguous, so nothing is copied either.

Forward saves only x and rstd = 1/sqrt(mean(x^2) + eps) (one fp32 per row). With
xhat = x * rstd and g = dy * (offset + weight), the backward is

    dx = rstd * (g - xhat * mean(g * xhat))         (per row)
    dweight = sum over rows of dy * xhat

dweight is reduced deterministically: a fixed number of programs (Triton) or row chunks (C++)
each sum their rows in order into an fp32 partial row, and the partials are summed in order.

Backends: `triton` (kernels below), `cpu` (csrc/rms_norm.cpp, vectorised, OpenMP over rows),
`torch` (`rms_norm_ref`, the specification; autograd does its backward).
"""

from __future__ import annotations

import torch

from packtune.kernels._dispatch import cpu_extension, launch_device, register_op, resolve_backend
from packtune.kernels._triton import tl, triton

register_op("rms_norm", ("triton", "cpu", "torch"))


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 offset: float = 0.0) -> torch.Tensor:
    """The specification: normalise in (at least) fp32, scale by offset + weight, return x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    scale = weight.to(compute) if offset == 0 else offset + weight.to(compute)
    return (xc * rstd * scale).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, offset, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols,
                         rows_per_program, offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for row in range(start, end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _block(n_cols: int) -> int:
    return triton.next_power_of_2(n_cols)


def _num_warps(block: int) -> int:
    """More warps for wider rows, so each thread holds a handful of elements (as Liger sizes them)."""
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _num_programs(n_rows: int, device: torch.device) -> int:
    """Programs in the backward: one wave on a GPU, a few under the interpreter."""
    if device.type == "cuda":
        return max(1, min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count * 4))
    return max(1, min(n_rows, 4))


def _triton_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float,
                    offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows:
        block = _block(n_cols)
        with launch_device(x2):
            _rms_norm_fwd_kernel[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                                            offset, BLOCK=block, num_warps=_num_warps(block))
    return y, rstd


def _triton_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2)
    programs = _num_programs(n_rows, x2.device)
    partial = torch.zeros(programs, n_cols, dtype=torch.float32, device=x2.device)
    if n_rows:
        block = _block(n_cols)
        with launch_device(x2):
            _rms_norm_bwd_kernel[(programs,)](dy, x2, weight, rstd, dx, partial, dy.stride(0), x2.stride(0),
                                              dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, programs),
                                              offset, BLOCK=block, num_warps=_num_warps(block))
    return dx, partial.sum(0)


# The C++ kernels take an fp32 copy of the weight anyway; the offset is added in that copy
# (dweight = sum dy * xhat does not depend on it).
def _cpu_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.packtune.rms_norm_fwd(x2, (weight.float() + offset).contiguous(), eps)


def _cpu_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                  offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.packtune.rms_norm_bwd(dy, x2, (weight.float() + offset).contiguous(), rstd)


if cpu_extension() is not None:  # shapes for torch.compile's fake tensors; the kernels are in C++

    @torch.library.register_fake("packtune::rms_norm_fwd")
    def _(x, weight, eps):
        return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)

    @torch.library.register_fake("packtune::rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return torch.empty_like(x), weight.new_empty(weight.shape, dtype=torch.float32)


_IMPLS = {"triton": (_triton_forward, _triton_backward), "cpu": (_cpu_forward, _cpu_backward)}


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                backend: str) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()
        y, rstd = _IMPLS[backend][0](x2, weight, eps, offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.backend, ctx.offset = backend, offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx, dw = _IMPLS[ctx.backend][1](dy2, x2, weight, rstd, ctx.offset)
        return dx.view(dy.shape), dw.to(weight.dtype), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` (any leading shape), scaled by `offset + weight`;
    returns x's dtype."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) "
                         f"to match the last dimension of x {tuple(x.shape)}")
    backend = resolve_backend("rms_norm", x.device, backend)
    if backend == "cpu" and x.dtype == torch.float64:  # the C++ kernels compute in fp32
        backend = "torch"
    if backend == "torch":
        return rms_norm_ref(x, weight, eps, offset)
    return RMSNormFunction.apply(x, weight, eps, float(offset), backend)


class RMSNorm(torch.nn.Module):
    """Drop-in for Hugging Face's LlamaRMSNorm (same `weight` parameter name, same eps meaning);
    with `offset=1.0`, for Gemma's RMSNorm (scale 1 + weight, weight initialised to zero)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, offset: float = 0.0,
                 backend: str | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))
        self.eps = eps
        self.offset = offset
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, offset=self.offset, backend=self.backend)

    def extra_repr(self) -> str:
        offset = f", offset={self.offset}" if self.offset else ""
        return f"{self.weight.shape[0]}, eps={self.eps}{offset}"
