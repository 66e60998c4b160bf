"""FlexAttention over packed rows (CUDA): T5's relative-position-biased self-attention, which no
flash-attn kernel has (it takes no arbitrary bias).

Each token's segment id and position within its segment are computed on the device from
cu_seqlens (a searchsorted: no host sync). The block mask keeps a query's own segment (and, causal,
the keys at or before it), so FlexAttention skips every block two segments share nothing of; the
score_mod adds `bias[h, (j - i) + max_seqlen - 1]`, the index clamped to the bias' range (a
partially masked block also scores pairs from two segments, whose distance may exceed it; their
scores are masked after). The bias is a captured tensor that requires grad: the compiled backward
scatters its gradient with atomics (so that gradient's summation order is not deterministic).
Queries and keys may be cut differently (cross-attention: `cu_seqlens_q`, `cu_seqlens_k`).
Rows past cu_seqlens_q[-1] come back as zeros.
"""

from __future__ import annotations

import functools

import torch

from packtune.kernels.attention import zero_tail


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def segments(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's segment id and position within it (int32 `[num_tokens]`, on cu_seqlens' device);
    tokens past cu_seqlens[-1] get segment id n (a segment of their own)."""
    cu = cu_seqlens.to(torch.int32)
    tokens = torch.arange(num_tokens, device=cu.device, dtype=torch.int32)
    ids = torch.searchsorted(cu[1:], tokens, right=True).to(torch.int32)
    return ids, tokens - cu[ids]


def flex_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, *, causal: bool, scale: float | None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Query segment i of q `[Tq, H, D]` attends to key segment i of k, v `[Tk, H, D]` (causal: keys
    at positions up to the query's), logits + `bias[h, (j - i) + center]` when a bias `[H, 2c + 1]`
    is given. Returns `[Tq, H, D]`."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_ids, q_pos = segments(cu_seqlens_q, q.shape[0])
    k_ids, k_pos = segments(cu_seqlens_k, k.shape[0])

    def mask_mod(b, h, qi, ki):
        same = q_ids[qi] == k_ids[ki]
        return same & (k_pos[ki] <= q_pos[qi]) if causal else same

    score_mod = None
    if bias is not None:
        center = (bias.shape[1] - 1) // 2

        def score_mod(score, b, h, qi, ki):
            relative = torch.clamp(k_pos[ki] - q_pos[qi], -center, center)
            return score + bias[h, relative + center]

    block_mask = create_block_mask(mask_mod, None, None, q.shape[0], k.shape[0], device=q.device)
    out = _compiled_flex()(*(t.transpose(0, 1)[None] for t in (q, k, v)), score_mod=score_mod,
                           block_mask=block_mask, scale=scale)
    return zero_tail(out[0].transpose(0, 1), cu_seqlens_q)
