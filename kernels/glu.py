"""Gated linear units: y = act(gate) * up, fused forward and backward, fp32 math for any input dtype.

`act` is a parameter: `silu` (SwiGLU: Llama, Mistral, Qwen, Phi-3) or `gelu_tanh` (GeGLU: Gemma;
GELU with the tanh approximation, torch's `approximate="tanh"`, transformers' `gelu_pytorch_tanh`).
Both are act(g) = g * sigmoid(z(g)), since 0.5 * (1 + tanh(x)) = sigmoid(2x):

    silu:       z = g                              z' = 1
    gelu_tanh:  z = 2c * (g + a * g^3)             z' = 2c * (1 + 3a * g^2)     c = sqrt(2 / pi), a = 0.044715

so with s = sigmoid(z), act'(g) = s * (1 + g * (1 - s) * z'), and

    dup   = dy * g * s
    dgate = dy * up * s * (1 + g * (1 - s) * z')

Forward saves gate and up (no activation); backward recomputes s in the same pass. One read of
gate and up and one write of y in the forward; one read of dy, gate, up and one write of dgate and
dup in the backward, against eager PyTorch's four to six temporaries. The C++ kernels
(csrc/glu.cpp) are the same template over the activation.

Inputs may be row-strided views (e.g. the two halves of a fused gate_up projection): only the
last dimension needs to be contiguous.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from packtune.kernels._dispatch import cpu_extension, launch_device, register_op, resolve_backend
from packtune.kernels._triton import tl, triton

register_op("glu", ("triton", "cpu", "torch"))

ACTIVATIONS = ("silu", "gelu_tanh")
_BLOCK = 1024
_TWO_C = 2 * math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def glu_ref(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The specification, in the input dtype: Hugging Face's LlamaMLP (silu) or GemmaMLP (gelu_tanh)
    activation times up."""
    _check_activation(activation)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return act * up


def glu_grad_ref(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str = "silu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of act(gate) * up by the module docstring's formulas, in the input dtype."""
    if activation == "silu":
        z, dz = gate, 1.0
    else:
        z, dz = _TWO_C * gate * (1 + _CUBIC * gate * gate), _TWO_C * (1 + 3 * _CUBIC * gate * gate)
    s = torch.sigmoid(z)
    return dy * up * s * (1 + gate * (1 - s) * dz), dy * gate * s


@triton.jit
def act_and_grad(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) in fp32 (the module docstring's formulas); the LoRA MLP's kernels use it too."""
    if ACTIVATION == "gelu_tanh":  # _TWO_C and _CUBIC as literals: a jit function reads no float globals
        z = 1.5957691216057308 * g * (1.0 + 0.044715 * g * g)
        dz = 1.5957691216057308 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        z = g
        dz = 1.0
    s = tl.sigmoid(z)
    return g * s, s * (1.0 + g * (1.0 - s) * dz)


@triton.jit
def _glu_fwd_kernel(G, U, Y, stride_g, stride_u, n_cols, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = act_and_grad(g, ACTIVATION)
    tl.store(Y + row * n_cols + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DY, G, U, DG, DU, stride_g, stride_u, n_cols, ACTIVATION: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act, act_grad = act_and_grad(g, ACTIVATION)
    tl.store(DG + row * n_cols + cols, (dy * u * act_grad).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * n_cols + cols, (dy * act).to(DU.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


def _triton_forward(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if y.numel():
        with launch_device(g):
            _glu_fwd_kernel[_grid(*g.shape)](g, u, y, g.stride(0), u.stride(0), g.shape[1],
                                             ACTIVATION=activation, BLOCK=_BLOCK)
    return y


def _triton_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    if dg.numel():
        with launch_device(g):
            _glu_bwd_kernel[_grid(*g.shape)](dy, g, u, dg, du, g.stride(0), u.stride(0), g.shape[1],
                                             ACTIVATION=activation, BLOCK=_BLOCK)
    return dg, du


def _cpu_forward(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.ops.packtune.glu_fwd(g, u, activation)


def _cpu_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.packtune.glu_bwd(dy, g, u, activation)


if cpu_extension() is not None:  # shapes for torch.compile's fake tensors; the kernels are in C++

    @torch.library.register_fake("packtune::glu_fwd")
    def _(gate, up, activation):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("packtune::glu_bwd")
    def _(dy, gate, up, activation):
        return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


_IMPLS = {"triton": (_triton_forward, _triton_backward), "cpu": (_cpu_forward, _cpu_backward)}


def _backend(gate: torch.Tensor, backend: str | None = None) -> str:
    chosen = resolve_backend("glu", gate.device, backend)
    return "torch" if chosen == "cpu" and gate.dtype == torch.float64 else chosen  # C++ computes in fp32


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[N, C] view of t with a unit last stride (copies only when it has to)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < t2.shape[1]):
        t2 = t2.contiguous()
    return t2


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up on [N, C] rows without autograd, for fused callers (the LoRA MLP)."""
    chosen = _backend(gate)
    return glu_ref(gate, up, activation) if chosen == "torch" else _IMPLS[chosen][0](gate, up, activation)


def glu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) on [N, C] rows without autograd, the backward of `glu_forward`."""
    chosen = _backend(gate)
    if chosen == "torch":
        return glu_grad_ref(dy, gate, up, activation)
    return _IMPLS[chosen][1](dy.contiguous(), gate, up, activation)


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str, backend: str) -> torch.Tensor:
        g2, u2 = _rows(gate), _rows(up)
        y = _IMPLS[backend][0](g2, u2, activation)
        ctx.save_for_backward(g2, u2)
        ctx.activation, ctx.backend = activation, backend
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        dg, du = _IMPLS[ctx.backend][1](dy.reshape(g2.shape).contiguous(), g2, u2, ctx.activation)
        return dg.view(dy.shape), du.view(dy.shape), None, None


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *, backend: str | None = None
        ) -> torch.Tensor:
    """act(gate) * up for tensors of the same shape and dtype (any leading shape); `activation` is
    "silu" or "gelu_tanh"."""
    _check_activation(activation)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"glu: gate {tuple(gate.shape)} {gate.dtype} {gate.device} and up "
                         f"{tuple(up.shape)} {up.dtype} {up.device} must match in shape, dtype and device")
    backend = _backend(gate, backend)
    if backend == "torch":
        return glu_ref(gate, up, activation)
    return GLUFunction.apply(gate, up, activation, backend)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up: `glu` with activation="silu"."""
    return glu(gate, up, "silu", backend=backend)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up: `glu` with activation="gelu_tanh"."""
    return glu(gate, up, "gelu_tanh", backend=backend)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the input dtype (Hugging Face's LlamaMLP activation)."""
    return glu_ref(gate, up, "silu")


def geglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up in the input dtype (Hugging Face's GemmaMLP activation)."""
    return glu_ref(gate, up, "gelu_tanh")


class SwiGLU(torch.nn.Module):
    """The activation of a gated MLP: forward(gate, up) = silu(gate) * up."""

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up, backend=self.backend)
