"""FlexAttention over packed rows (CUDA): T5's relative-position-biased self-attention, which no
flash-attn kernel has (it takes no arbitrary bias).

Each token's segment id and position within its segment are computed on the device from
cu_seqlens (a searchsorted: no host sync). The block mask keeps a query's own segment (and, causal,
the keys at or before it), so FlexAttention skips every block two segments share nothing of; the
score_mod adds `bias[h, (j - i) + center]`, the index clamped to the bias' range (a partially masked
block also scores pairs from two segments, whose distance may exceed it; their scores are masked
after). The bias is a captured tensor that requires grad: the compiled backward scatters its
gradient with atomics (so that gradient's summation order is not deterministic). Queries and keys
may be cut differently (cross-attention: `cu_seqlens_q`, `cu_seqlens_k`).

The kernel is compiled for static shapes, so every row is padded to a power of two (at least 128
tokens) and the bias to that length: a packed row's length changes from batch to batch, and this
bounds the compiled variants to a few. Padded tokens (and rows past cu_seqlens[-1]) belong to no
segment: their blocks are skipped and their rows come back as zeros.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MIN_PADDED = 128
"""FlexAttention's block size: the shortest padded row."""


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def padded_length(n: int) -> int:
    """The power of two (at least MIN_PADDED) a row of n tokens is padded to."""
    return max(MIN_PADDED, 1 << (n - 1).bit_length())


def segments(cu_seqlens: torch.Tensor, num_tokens: int, outside: int = -1
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's segment id and position within it (int32 `[num_tokens]`, on cu_seqlens' device);
    tokens past cu_seqlens[-1] get segment id `outside`."""
    cu = cu_seqlens.to(torch.int32)
    tokens = torch.arange(num_tokens, device=cu.device, dtype=torch.int32)
    ids = torch.searchsorted(cu[1:], tokens, right=True).to(torch.int32)
    positions = tokens - cu[ids.clamp(max=cu.numel() - 1)]
    return torch.where(tokens < cu[-1], ids, outside), positions


def flex_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, *, causal: bool, scale: float | None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Query segment i of q `[Tq, H, D]` attends to key segment i of k, v `[Tk, H, D]` (causal: keys
    at positions up to the query's), logits + `bias[h, (j - i) + c]` when a bias `[H, 2c + 1]` is
    given. Returns `[Tq, H, D]`."""
    from torch.nn.attention.flex_attention import create_block_mask

    tq, tk = q.shape[0], k.shape[0]
    pq, pk = padded_length(tq), padded_length(tk)
    q_ids, q_pos = segments(cu_seqlens_q, pq, outside=-1)
    k_ids, k_pos = segments(cu_seqlens_k, pk, outside=-2)  # -1 != -2: padding attends to nothing

    def mask_mod(b, h, qi, ki):
        same = q_ids[qi] == k_ids[ki]
        return same & (k_pos[ki] <= q_pos[qi]) if causal else same

    score_mod = None
    if bias is not None:
        # a bias of the padded length (static shapes), in fp32: the scores are, and its gradient's
        # atomic adds (up to a row's tokens per entry) would lose too much in bf16
        extra = max(pq, pk) - (bias.shape[1] + 1) // 2
        bias = F.pad(bias.float(), (extra, extra))

        def score_mod(score, b, h, qi, ki):
            center = (bias.shape[1] - 1) // 2
            relative = torch.clamp(k_pos[ki] - q_pos[qi], -center, center)
            return score + bias[h, relative + center]

    block_mask = create_block_mask(mask_mod, None, None, pq, pk, device=q.device)
    qp, kp, vp = (F.pad(t, (0, 0, 0, 0, 0, n - t.shape[0])).transpose(0, 1)[None]
                  for t, n in ((q, pq), (k, pk), (v, pk)))
    out = _compiled_flex()(qp, kp, vp, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out[0, :, :tq].transpose(0, 1)
