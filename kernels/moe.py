"""Mixture-of-experts expert block: y_t = sum_k w_tk * down_e(act(gate_e(x_t)) * up_e(x_t)), e = idx_tk.

The caller's router gives, per token, the indices [T, k] of its k experts and their weights [T, k];
this op runs the experts. The expert weights are taken as transformers 5 stores them (fused, one
3-D tensor per projection; `ExpertFormat` says which of its two layouts):

    Qwen3-MoE, Mixtral, OLMoE (`SWIGLU`)   gate_up_proj [E, 2I, H], down_proj [E, H, I]: out-by-in,
                                           as nn.Linear; gate = first I rows, up = last I; no biases
    gpt-oss (`gpt_oss_format(...)`)        gate_up_proj [E, H, 2I], down_proj [E, I, H]: in-by-out;
                                           gate = even columns, up = odd; biases [E, 2I] and [E, H]

and one gated activation covers both: h = g' * sigmoid(alpha g') * (u' + up_shift), g' = min(g, limit),
u' = clamp(u, -limit, limit); SwiGLU is alpha 1, no limit, shift 0; gpt-oss's is alpha 1.702, limit 7,
shift 1 (transformers' GptOssExperts._apply_gate). The routing weight multiplies the down
projection's output including its bias, as in transformers.

How it runs (one layer): the T*k (token, expert) pairs are sorted by expert once (a stable sort of
the expert ids; each expert's rows end at `searchsorted`, computed on the device: bincount would
read its maximum back to the host); one grouped GEMM over all experts gives the gate/up projection
of the gathered rows, one gives the down projection; the un-permute sums each token's k rows. The
backward uses the same grouping: dy is gathered to the sorted rows, the down projection's
transposed GEMM gives dh (the routing weight's gradient is then <dh_unweighted, h> per row, so the
forward keeps no [T*k, H] tensor), one pass applies the activation's backward, then the weight
gradients per expert and dx. The forward saves the pre-activation gate/up rows [T*k, 2I] only.

Backends (`moe_experts` op): `triton` (CUDA, or the interpreter; moe_triton.py): grouped GEMMs that
read each expert's rows from device tensors (no host sync), the gather fused into their loads, the
activation fused into the gate/up GEMM's epilogue and the routing weight and bias into the down
GEMM's; `cpu` (packtune._C, csrc/moe.cpp): the experts in parallel over CPU threads, each a chain
of BLAS GEMMs on its contiguous slice of sorted rows with the activation, bias and weighting in
fused loops (float64 in float64); `torch`: `moe_experts_ref`, the specification (a loop over
experts, as transformers' eager experts), which also runs float64 where `triton` is chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from packtune.kernels import moe_triton
from packtune.kernels._dispatch import cpu_extension, register_op, resolve_backend

__all__ = ["SWIGLU", "ExpertFormat", "ExpertRouting", "gpt_oss_format", "moe_experts", "moe_experts_ref",
           "route_to_experts"]

register_op("moe_experts", ("triton", "cpu", "torch"))


@dataclass(frozen=True)
class ExpertFormat:
    """How a family stores its experts' weights and gates them (see the module docstring)."""

    transposed: bool = False
    """Weights stored in-by-out (gate_up [E, H, 2I], down [E, I, H]: gpt-oss); else out-by-in."""
    interleaved: bool = False
    """gate and up alternate along the 2I axis (gate = [..., ::2]: gpt-oss); else two halves."""
    alpha: float = 1.0
    limit: float = math.inf
    up_shift: float = 0.0

    def in_out(self, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [E, H, 2I] and [E, I, H] of the stored weights (no copy): rows @ view[e] projects."""
        if self.transposed:
            return gate_up, down
        return gate_up.transpose(1, 2), down.transpose(1, 2)

    def gate_and_up(self, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.interleaved:
            return gu[..., ::2], gu[..., 1::2]
        return gu.chunk(2, dim=-1)

    def activation(self, gu: torch.Tensor) -> torch.Tensor:
        """h from the gate/up projection rows [..., 2I] (in torch ops, autograd-differentiable)."""
        gate, up = self.gate_and_up(gu)
        if self.limit != math.inf:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha) if self.alpha != 1.0 else torch.nn.functional.silu(gate)
        return glu * (up + self.up_shift) if self.up_shift else glu * up


SWIGLU = ExpertFormat()
"""Qwen3-MoE, Mixtral and OLMoE (hidden_act "silu")."""


def gpt_oss_format(alpha: float = 1.702, limit: float = 7.0) -> ExpertFormat:
    """gpt-oss: config.swiglu_alpha and config.swiglu_limit (defaults: gpt-oss-20b/120b's)."""
    return ExpertFormat(transposed=True, interleaved=True, alpha=float(alpha), limit=float(limit),
                        up_shift=1.0)


def moe_experts_ref(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                    gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                    fmt: ExpertFormat = SWIGLU) -> torch.Tensor:
    """The specification, in torch ops (autograd gives every gradient): for each expert, its
    tokens' rows through gate_up, the activation, down, times their routing weights, added back."""
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, top_k_weights.dtype), device=x.device)
    w_gate_up, w_down = fmt.in_out(gate_up_proj, down_proj)
    for e in range(w_gate_up.shape[0]):
        token, slot = torch.where(top_k_index == e)
        gu = x[token] @ w_gate_up[e]
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e]
        y = fmt.activation(gu) @ w_down[e]
        if down_bias is not None:
            y = y + down_bias[e]
        out = out.index_add(0, token, y * top_k_weights[token, slot, None])
    return out.to(x.dtype)


class ExpertRouting(NamedTuple):
    """The (token, expert) pairs sorted by expert; pair p = t * k + j is token t's j-th choice."""

    order: torch.Tensor
    """[S] int64: the pair at sorted row r."""
    token: torch.Tensor
    """[S] int64: its token (order // k)."""
    expert: torch.Tensor
    """[S] int64: its expert (sorted ascending)."""
    ends: torch.Tensor
    """[E] int64: expert e owns sorted rows [ends[e-1], ends[e]) (ends[-1] = 0)."""
    position: torch.Tensor
    """[S] int64: the sorted row of pair p (the inverse of `order`)."""


def route_to_experts(top_k_index: torch.Tensor, num_experts: int) -> ExpertRouting:
    """Sort the pairs by expert, on the device (no host sync)."""
    ids = top_k_index.reshape(-1).long()
    expert, order = torch.sort(ids, stable=True)
    ends = torch.searchsorted(expert, torch.arange(num_experts, device=ids.device), right=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=ids.device))
    return ExpertRouting(order, order // top_k_index.shape[-1], expert, ends, position)


def _cpu_forward(x, routing, w_sorted, gate_up, gate_up_bias, down, down_bias, fmt, save):
    return torch.ops.packtune.moe_experts_fwd(x, routing.token, routing.ends, routing.position, w_sorted,
                                              gate_up, gate_up_bias, down, down_bias, fmt.transposed,
                                              fmt.interleaved, fmt.alpha, fmt.limit, fmt.up_shift, save)


def _cpu_backward(dy, x, routing, w_sorted, gu, gate_up, gate_up_bias, down, down_bias, fmt, needs):
    return torch.ops.packtune.moe_experts_bwd(dy, x, routing.token, routing.ends, routing.position, w_sorted,
                                              gu, gate_up, gate_up_bias, down, down_bias, fmt.transposed,
                                              fmt.interleaved, fmt.alpha, fmt.limit, fmt.up_shift, needs[0],
                                              needs[1])


if cpu_extension() is not None:  # shapes for torch.compile's fake tensors; the kernels are in C++

    @torch.library.register_fake("packtune::moe_experts_fwd")
    def _(x, token, ends, position, weight, gate_up, gate_up_bias, down, down_bias, *flags):
        transposed, save = flags[0], flags[-1]
        rows = token.shape[0] if save else 0
        return x.new_empty(x.shape), x.new_empty((rows, gate_up.shape[2] if transposed else gate_up.shape[1]))

    @torch.library.register_fake("packtune::moe_experts_bwd")
    def _(dy, x, token, ends, position, weight, gu, gate_up, gate_up_bias, down, down_bias, *flags):
        need_dx, need_weights = flags[-2:]

        def like(t, needed):
            return x.new_empty(t.shape if needed and t is not None else (0,))

        return (like(x, need_dx), weight.new_empty(weight.shape), like(gate_up, need_weights),
                like(gate_up_bias, need_weights), like(down, need_weights), like(down_bias, need_weights))


_IMPLS = {"triton": (moe_triton.forward, moe_triton.backward), "cpu": (_cpu_forward, _cpu_backward)}


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, fmt, backend):
        routing = route_to_experts(top_k_index, gate_up.shape[0])
        opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
        w_sorted = top_k_weights.reshape(-1)[routing.order].to(opmath)
        out, gu = _IMPLS[backend][0](x, routing, w_sorted, gate_up, gate_up_bias, down, down_bias, fmt,
                                       any(ctx.needs_input_grad))
        ctx.save_for_backward(x, gu, w_sorted, gate_up, gate_up_bias, down, down_bias, *routing)
        ctx.fmt, ctx.backend = fmt, backend
        ctx.weights_shape, ctx.weights_dtype = top_k_weights.shape, top_k_weights.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        x, gu, w_sorted, gate_up, gate_up_bias, down, down_bias, *routing = ctx.saved_tensors
        routing = ExpertRouting(*routing)
        need = ctx.needs_input_grad
        need_weights = need[3] or need[4] or need[5] or need[6]
        dx, dw_sorted, dgu, dgu_bias, ddown, ddown_bias = _IMPLS[ctx.backend][1](
            dy.contiguous(), x, routing, w_sorted, gu, gate_up, gate_up_bias, down, down_bias, ctx.fmt,
            (need[0], need_weights))
        dw = dw_sorted[routing.position].view(ctx.weights_shape).to(ctx.weights_dtype) if need[2] else None
        return (dx if need[0] else None, None, dw, dgu if need[3] else None, ddown if need[4] else None,
                dgu_bias if need[5] else None, ddown_bias if need[6] else None, None, None)


def _check(x, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, fmt) -> None:
    def fail(what: str):
        raise ValueError(f"moe_experts: {what}")

    if x.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape \
            or top_k_index.shape[0] != x.shape[0]:
        fail(f"x must be [T, H] and top_k_index / top_k_weights [T, k], got {tuple(x.shape)}, "
             f"{tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool or \
            not top_k_weights.dtype.is_floating_point:
        fail(f"top_k_index must be integer and top_k_weights floating, got {top_k_index.dtype}, "
             f"{top_k_weights.dtype}")
    if gate_up.dim() != 3 or down.dim() != 3:
        fail(f"gate_up_proj and down_proj must be 3-D, got {tuple(gate_up.shape)}, {tuple(down.shape)}")
    w_gate_up, w_down = fmt.in_out(gate_up, down)
    e, h, i2 = w_gate_up.shape
    layout = "[E, H, 2I] and [E, I, H]" if fmt.transposed else "[E, 2I, H] and [E, H, I]"
    if h != x.shape[1] or i2 % 2 or w_down.shape != (e, i2 // 2, h):
        fail(f"with hidden {x.shape[1]}, gate_up_proj {tuple(gate_up.shape)} and down_proj "
             f"{tuple(down.shape)} are not {layout} (ExpertFormat(transposed={fmt.transposed}))")
    for name, bias, size in (("gate_up_bias", gate_up_bias, i2), ("down_bias", down_bias, h)):
        if bias is not None and bias.shape != (e, size):
            fail(f"{name} must be [{e}, {size}], got {tuple(bias.shape)}")
    tensors = [t for t in (gate_up, down, gate_up_bias, down_bias) if t is not None]
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors) or top_k_index.device != x.device:
        fail(f"the expert weights must have x's dtype and device ({x.dtype}, {x.device}), got "
             f"{', '.join(f'{t.dtype} {t.device}' for t in tensors)}")
    if x.device.type == "cpu" and top_k_index.numel() and not torch.compiler.is_compiling():
        if top_k_index.min() < 0 or top_k_index.max() >= e:
            fail(f"top_k_index must lie in [0, {e}), got [{top_k_index.min()}, {top_k_index.max()}]")
    elif top_k_index.numel():  # checked on the device, without waiting for it
        torch._assert_async(((top_k_index >= 0) & (top_k_index < e)).all(),
                            f"moe_experts: top_k_index must lie in [0, {e})")


def moe_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, fmt: ExpertFormat = SWIGLU, *,
                backend: str | None = None) -> torch.Tensor:
    """The expert block's output [T, H] for hidden states x [T, H], the router's choices top_k_index
    [T, k] and weights top_k_weights [T, k], and the experts' weights as transformers stores them
    (`fmt`: see the module docstring). Differentiable in x, the routing weights, weights and biases."""
    _check(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, fmt)
    backend = resolve_backend("moe_experts", x.device, backend)
    if backend == "torch" or x.dtype == torch.float64 and backend == "triton":
        return moe_experts_ref(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias,
                               down_bias, fmt)
    return MoEExpertsFunction.apply(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias,
                                    down_bias, fmt, backend)
