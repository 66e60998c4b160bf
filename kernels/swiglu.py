"""SwiGLU: y = silu(gate) * up, fused forward and backward, fp32 math for any input dtype.

With s = sigmoid(gate), silu(gate) = gate * s and silu'(gate) = s * (1 + gate * (1 - s)), so

    dup   = dy * gate * s
    dgate = dy * up * s * (1 + gate * (1 - s))

Forward saves gate and up (no activation); backward recomputes s in the same pass. One read of
gate and up and one write of y in the forward; one read of dy, gate, up and one write of dgate and
dup in the backward, against eager PyTorch's four to six temporaries.

Inputs may be row-strided views (e.g. the two halves of a fused gate_up projection): only the
last dimension needs to be contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packtune.kernels._dispatch import cpu_extension, launch_device, register_op, resolve_backend
from packtune.kernels._triton import tl, triton

register_op("swiglu", ("triton", "cpu", "torch"))

_BLOCK = 1024


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The specification (Hugging Face's LlamaMLP activation): silu(gate) * up in the input dtype."""
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    du = dy * g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + row * n_cols + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * n_cols + cols, du.to(DU.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


def _triton_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if y.numel():
        with launch_device(g):
            _swiglu_fwd_kernel[_grid(*g.shape)](g, u, y, g.stride(0), u.stride(0), g.shape[1], BLOCK=_BLOCK)
    return y


def _triton_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    if dg.numel():
        with launch_device(g):
            _swiglu_bwd_kernel[_grid(*g.shape)](dy, g, u, dg, du, g.stride(0), u.stride(0), g.shape[1],
                                                BLOCK=_BLOCK)
    return dg, du


def _cpu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.ops.packtune.swiglu_fwd(g, u)


def _cpu_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.packtune.swiglu_bwd(dy, g, u)


if cpu_extension() is not None:  # shapes for torch.compile's fake tensors; the kernels are in C++

    @torch.library.register_fake("packtune::swiglu_fwd")
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("packtune::swiglu_bwd")
    def _(dy, gate, up):
        return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


_IMPLS = {"triton": (_triton_forward, _triton_backward), "cpu": (_cpu_forward, _cpu_backward)}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[N, C] view of t with a unit last stride (copies only when it has to)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < t2.shape[1]):
        t2 = t2.contiguous()
    return t2


def swiglu_grad_ref(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of silu(gate) * up (see the module docstring for the formulas)."""
    s = torch.sigmoid(gate)
    return dy * up * s * (1 + gate * (1 - s)), dy * gate * s


def autograd_free(op: str, impls: dict, reference, reference_grad):
    """(forward(gate, up), backward(dy, gate, up)) of a gated activation on [N, C] rows without
    autograd, for fused callers (the LoRA MLP): `op`'s kernels from `impls`, or the reference where
    `op` resolves to torch, and for fp64 on the cpu backend (its C++ kernels compute in fp32)."""

    def backend(t: torch.Tensor) -> str:
        chosen = resolve_backend(op, t.device)
        return "torch" if chosen == "cpu" and t.dtype == torch.float64 else chosen

    def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        chosen = backend(gate)
        return reference(gate, up) if chosen == "torch" else impls[chosen][0](gate, up)

    def backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = backend(gate)
        if chosen == "torch":
            return reference_grad(dy, gate, up)
        return impls[chosen][1](dy.contiguous(), gate, up)

    return forward, backward


swiglu_forward, swiglu_backward = autograd_free("swiglu", _IMPLS, swiglu_ref, swiglu_grad_ref)


class SwiGLUFunction(torch.autograd.Function):
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


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up for tensors of the same shape and dtype (any leading shape)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} {gate.device} and up "
                         f"{tuple(up.shape)} {up.dtype} {up.device} must match in shape, dtype and device")
    backend = resolve_backend("swiglu", gate.device, backend)
    if backend == "cpu" and gate.dtype == torch.float64:  # the C++ kernels compute in fp32
        backend = "torch"
    if backend == "torch":
        return swiglu_ref(gate, up)
    return SwiGLUFunction.apply(gate, up, backend)


class SwiGLU(torch.nn.Module):
    """The activation of a gated MLP: forward(gate, up) = silu(gate) * up."""

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up, backend=self.backend)
