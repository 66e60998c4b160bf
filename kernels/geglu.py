"""GeGLU: y = gelu_tanh(gate) * up (Gemma's MLP activation), fused forward and backward, fp32 math.

gelu_tanh is GELU with the tanh approximation (torch's `approximate="tanh"`, transformers'
`gelu_pytorch_tanh`). With u = c * (gate + a * gate^3), c = sqrt(2 / pi), a = 0.044715, t = tanh(u):

    gelu_tanh(gate)  = 0.5 * gate * (1 + t)
    gelu_tanh'(gate) = 0.5 * (1 + t) + 0.5 * gate * (1 - t^2) * c * (1 + 3a * gate^2)
    dup   = dy * gelu_tanh(gate)
    dgate = dy * up * gelu_tanh'(gate)

Forward saves gate and up (no activation); backward recomputes t. Inputs may be row-strided views
(the halves of a fused gate_up projection): only the last dimension needs to be contiguous.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from packtune.kernels._dispatch import cpu_extension, launch_device, register_op, resolve_backend
from packtune.kernels._triton import tl, triton
from packtune.kernels.swiglu import _rows, autograd_free

register_op("geglu", ("triton", "cpu", "torch"))

_BLOCK = 1024
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def geglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The specification (Hugging Face's GemmaMLP activation): gelu_tanh(gate) * up in the input dtype."""
    return F.gelu(gate, approximate="tanh") * up


@triton.jit
def _tanh(u):
    # overflow-free: tanh(|u|) = (1 - e) / (1 + e) with e = exp(-2|u|)
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _geglu_fwd_kernel(G, U, Y, stride_g, stride_u, n_cols, C: tl.constexpr, A: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(C * (g + A * g * g * g))
    y = 0.5 * g * (1.0 + t) * u
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, G, U, DG, DU, stride_g, stride_u, n_cols, C: tl.constexpr, A: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(C * (g + A * g * g * g))
    gelu = 0.5 * g * (1.0 + t)
    dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * C * (1.0 + 3.0 * A * g * g)
    tl.store(DG + row * n_cols + cols, (dy * u * dgelu).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * n_cols + cols, (dy * gelu).to(DU.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


def _triton_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if y.numel():
        with launch_device(g):
            _geglu_fwd_kernel[_grid(*g.shape)](g, u, y, g.stride(0), u.stride(0), g.shape[1],
                                               C=_SQRT_2_OVER_PI, A=_CUBIC, BLOCK=_BLOCK)
    return y


def _triton_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    if dg.numel():
        with launch_device(g):
            _geglu_bwd_kernel[_grid(*g.shape)](dy, g, u, dg, du, g.stride(0), u.stride(0), g.shape[1],
                                               C=_SQRT_2_OVER_PI, A=_CUBIC, BLOCK=_BLOCK)
    return dg, du


def _cpu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.ops.packtune.geglu_fwd(g, u)


def _cpu_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.packtune.geglu_bwd(dy, g, u)


if cpu_extension() is not None:  # shapes for torch.compile's fake tensors; the kernels are in C++

    @torch.library.register_fake("packtune::geglu_fwd")
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("packtune::geglu_bwd")
    def _(dy, gate, up):
        return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


_IMPLS = {"triton": (_triton_forward, _triton_backward), "cpu": (_cpu_forward, _cpu_backward)}


def geglu_grad_ref(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of gelu_tanh(gate) * up (the module docstring's formulas)."""
    t = torch.tanh(_SQRT_2_OVER_PI * (gate + _CUBIC * gate**3))
    dgelu = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _CUBIC * gate * gate)
    return dy * up * dgelu, dy * 0.5 * gate * (1 + t)


geglu_forward, geglu_backward = autograd_free("geglu", _IMPLS, geglu_ref, geglu_grad_ref)


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
        g2, u2 = _rows(gate), _rows(up)
        y = _IMPLS[backend][0](g2, u2)
        ctx.save_for_backward(g2, u2)
        ctx.backend = backend
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        dg, du = _IMPLS[ctx.backend][1](dy.reshape(g2.shape).contiguous(), g2, u2)
        return dg.view(dy.shape), du.view(dy.shape), None


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up for tensors of the same shape and dtype (any leading shape)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"geglu: gate {tuple(gate.shape)} {gate.dtype} {gate.device} and up "
                         f"{tuple(up.shape)} {up.dtype} {up.device} must match in shape, dtype and device")
    backend = resolve_backend("geglu", gate.device, backend)
    if backend == "cpu" and gate.dtype == torch.float64:  # the C++ kernels compute in fp32
        backend = "torch"
    if backend == "torch":
        return geglu_ref(gate, up)
    return GeGLUFunction.apply(gate, up, backend)
