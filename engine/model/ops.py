"""The four ops the decoder calls, in plain PyTorch: RMSNorm, rotary embedding, SwiGLU, attention.

These are the reference implementations (the same math as transformers' Llama). They sit
behind small functions with the signatures of `packtune.kernels` so the packed-sequence kernels
replace them here, in one place, without touching the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """weight * x / rms(x), normalised in fp32 and cast back before the weight (as transformers)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[..., Hq, D]` and k `[..., Hk, D]` by per-token cos/sin `[..., D]` (rotate-half layout)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None, q_offset: int = 0
) -> torch.Tensor:
    """Causal attention on `[B, Lq, Hq, D]` queries and `[B, Lk, Hk, D]` keys/values (GQA allowed).

    Query i sits at position `q_offset + i` and key j at position j (a KV cache holds the keys of
    earlier positions). With `window`, a query sees the `window` most recent keys, itself
    included, as transformers' `sliding_window`.
    """
    lq, lk = q.shape[1], k.shape[1]
    mask, is_causal = None, False
    if q_offset == 0 and lq == lk and (window is None or window >= lk):
        is_causal = lq > 1
    else:
        q_pos = torch.arange(q_offset, q_offset + lq, device=q.device)[:, None]
        k_pos = torch.arange(lk, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """Exact causal attention within each packed sample `[T, H, D]`, none across samples.

    Sample i spans rows `cu_seqlens[i]:cu_seqlens[i+1]`. The reference runs SDPA once per sample,
    so no cross-sample score is ever computed (rather than masked), and costs no T x T mask.
    `max_seqlen` (the longest sample) sizes a kernel's launch grid; the reference does not need it.
    """
    if not causal:
        raise ValueError("varlen_attention: only causal attention is implemented")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must run from 0 to the {q.shape[0]} packed tokens, got {bounds[0]}..{bounds[-1]}"
        )
    outs = [
        causal_attention(q[None, s:e], k[None, s:e], v[None, s:e], window=window)[0]
        for s, e in zip(bounds[:-1], bounds[1:], strict=False)
    ]
    return torch.cat(outs) if len(outs) != 1 else outs[0]
