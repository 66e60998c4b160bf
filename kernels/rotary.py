"""Rotary position embedding for packed rows, in Hugging Face's rotate-half layout.

For a head vector x = [x1, x2] (halves of head_dim D) at position p, with the table rows
c = cos[p] and s = sin[p] (`emb = cat(freqs, freqs)`, so both halves of a row hold the same
frequencies):

    out = x * c + rotate_half(x) * s,   rotate_half([x1, x2]) = [-x2, x1]
    i.e. out1 = x1 * c1 - x2 * s1,  out2 = x2 * c2 + x1 * s2

The backward is the transposed rotation: dx1 = g1 * c1 + g2 * s2, dx2 = g2 * c2 - g1 * s1.

Positions come from the batch's `layout` (a PackedLayout, built on the host: packtune's model
always passes one), else `position_ids`, else restart at 0 for every sample of a packed row given
by `cu_seqlens` (computed on the device with `searchsorted`: no host sync), else 0..T-1 per row.
One launch rotates q and k together (any head counts, so GQA), one program per token. Rope
scaling (Llama 3.1, linear, dynamic ...) belongs to the caller: it shapes `inv_freq` before
`rope_cos_sin` builds the tables. Positions must be below the table length (not checked on the
device, which would need a host sync).
"""

from __future__ import annotations

import torch

from packtune.kernels._dispatch import cpu_extension, launch_device, register_op, resolve_backend
from packtune.kernels._triton import tl, triton
from packtune.kernels.packed_layout import PackedLayout

register_op("rotary", ("triton", "cpu", "torch"))


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int,
                 attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin tables `[max_positions, 2 * len(inv_freq)]`, as transformers computes them."""
    positions = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Position of every token within its own sample: t - cu_seqlens[sample(t)], on the device."""
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(num_tokens, device=cu.device)
    sample = torch.searchsorted(cu[1:], tokens, right=True)
    return tokens - cu[sample.clamp(max=cu.numel() - 1)]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
    """The specification for one of q/k: `x` `[..., H, D]`, `positions` over its flattened tokens."""
    compute = torch.promote_types(x.dtype, torch.float32)
    c = cos[positions].to(compute).view(*x.shape[:-2], 1, x.shape[-1])
    s = sin[positions].to(compute).view(*x.shape[:-2], 1, x.shape[-1])
    xc = x.to(compute)
    return (xc * c + rotate_half(xc) * s).to(x.dtype)


@triton.jit
def _rotate_heads(X, OUT, t, n_heads, stride_t, stride_h, c1, c2, s1, s2, half, d,
                  BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < n_heads) & (d < half)
    src = X + t * stride_t + h * stride_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    dst = OUT + (t * n_heads + h) * (2 * half) + d
    tl.store(dst, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + half, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, QO, KO, COS, SIN, POS, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
                   n_qh, n_kh, half, BACKWARD: tl.constexpr, BLOCK_QH: tl.constexpr,
                   BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < half
    row = pos * stride_cos + d
    c1 = tl.load(COS + row, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + row + half, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + row, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + row + half, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, t, n_qh, stride_qt, stride_qh, c1, c2, s1, s2, half, d, BACKWARD, BLOCK_QH)
    _rotate_heads(K, KO, t, n_kh, stride_kt, stride_kh, c1, c2, s1, s2, half, d, BACKWARD, BLOCK_KH)


def _triton_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n_tokens, n_qh, dim = q.shape
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if n_tokens:
        with launch_device(q):
            _rotary_kernel[(n_tokens,)](
                q, k, qo, ko, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                cos.stride(0), n_qh, k.shape[1], dim // 2, BACKWARD=backward,
                BLOCK_QH=triton.next_power_of_2(n_qh), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
                BLOCK_D=triton.next_power_of_2(dim // 2))
    return qo, ko


def _cpu_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.packtune.rotary(q, k, cos, sin, positions, backward)


if cpu_extension() is not None:  # shapes for torch.compile's fake tensors; the kernels are in C++

    @torch.library.register_fake("packtune::rotary")
    def _(q, k, cos, sin, positions, backward):
        return q.new_empty(q.shape), k.new_empty(k.shape)


_IMPLS = {"triton": _triton_rotate, "cpu": _cpu_rotate}


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    """`[N, H, D]` view of `[T, H, D]` or `[B, T, H, D]` with a unit last stride."""
    x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, positions, backend):
        q3, k3 = _heads_view(q), _heads_view(k)
        qo, ko = _IMPLS[backend](q3, k3, cos, sin, positions, False)
        ctx.save_for_backward(cos, sin, positions)
        ctx.backend = backend
        return qo.view(q.shape), ko.view(k.shape)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, positions = ctx.saved_tensors
        dq3, dk3 = _heads_view(dq), _heads_view(dk)
        gq, gk = _IMPLS[ctx.backend](dq3, dk3, cos, sin, positions, True)
        return gq.view(dq.shape), gk.view(dk.shape), None, None, None, None


def _positions(q: torch.Tensor, position_ids: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    n_tokens = q.shape[:-2].numel()
    if position_ids is not None:
        if position_ids.numel() != n_tokens:
            raise ValueError(f"rotary: position_ids has {position_ids.numel()} entries, q has {n_tokens} "
                             f"tokens (shape {tuple(q.shape)})")
        return position_ids.reshape(-1).to(device=q.device, dtype=torch.int64)
    if cu_seqlens is not None:
        return positions_from_cu_seqlens(cu_seqlens.to(q.device), n_tokens)
    seq_len = q.shape[-3]
    return torch.arange(seq_len, device=q.device).repeat(n_tokens // max(seq_len, 1))


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
           layout: PackedLayout | None = None, position_ids: torch.Tensor | None = None,
           cu_seqlens: torch.Tensor | None = None,
           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[T, Hq, D]` and k `[T, Hk, D]` (or `[B, T, H, D]`) by their positions; returns new (q, k).

    cos/sin: `[max_positions, D]` tables from `rope_cos_sin`. Positions: `layout.positions`, else
    `position_ids` (`[T]`, `[B, T]` or `[1, T]`), else restarting at 0 per sample of `cu_seqlens`
    (int32 offsets over the flattened tokens), else 0..T-1 in every row.
    """
    if q.dim() not in (3, 4) or k.dim() != q.dim() or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must both be [T, H, D] or "
                         "[B, T, H, D] with the same leading dimensions")
    dim = q.shape[-1]
    if dim % 2 or k.shape[-1] != dim or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != dim:
        raise ValueError(f"rotary: head_dim must be even and equal for q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}, and cos/sin tables [max_positions, {dim}] "
                         f"(got cos {tuple(cos.shape)}, sin {tuple(sin.shape)})")
    positions = _positions(q, layout.positions if layout is not None else position_ids, cu_seqlens)
    cos, sin = cos.to(q.device), sin.to(q.device)
    backend = resolve_backend("rotary", q.device, backend)
    if backend == "cpu" and q.dtype == torch.float64:  # the C++ kernels compute in fp32
        backend = "torch"
    if backend == "torch":
        return rotary_ref(q, cos, sin, positions), rotary_ref(k, cos, sin, positions)
    return RotaryFunction.apply(q, k, cos.float().contiguous(), sin.float().contiguous(), positions, backend)


class RotaryEmbedding(torch.nn.Module):
    """Holds the cos/sin tables for `inv_freq` (default: base**(-2i/D)) and applies `rotary`."""

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0, *,
                 inv_freq: torch.Tensor | None = None, attention_scaling: float = 1.0,
                 backend: str | None = None, device: torch.device | None = None):
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
                                      / head_dim)
        cos, sin = rope_cos_sin(inv_freq, max_positions, attention_scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(q, k, self.cos, self.sin, position_ids=position_ids, cu_seqlens=cu_seqlens,
                      backend=self.backend)
