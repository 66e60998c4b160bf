"""Varlen attention with a relative position bias: T5's self-attention over a packed row.

Within each segment (cu_seqlens), query i and key j (positions within the segment) score

    logits[h, i, j] = scale * q_i . k_j + bias[h, (j - i) + max_seqlen - 1]

where `bias` `[H, 2 * max_seqlen - 1]` holds one learned value per head and relative position. T5
builds it from its bucketed table (`relative_bias`): relative positions are grouped into
`num_buckets` buckets (exact for small distances, logarithmic up to `max_distance`), each bucket
holding one value per head (`relative_attention_bias.weight`, `[num_buckets, H]`). Because the
bias is indexed by positions within a segment, it never spans two segments, and a `[H, T, T]` bias
for the whole row is never formed. Gradients reach `bias` (hence the table) on every path.

Paths, chosen per call:

1. CUDA: FlexAttention (kernels/flex_segment_attention.py), compiled, with a score_mod reading `bias` and a
   block mask from the tokens' segment ids; its backward scatters the bias gradient with atomics.
2. Elsewhere (the CPU): length buckets as in kernels/attention.py: segments sorted by length, cut
   into buckets whose padding costs at most `BUCKET_WASTE` x their real tokens, one batched SDPA call
   per bucket with the bucket's `[H, L, L]` bias (the same for every segment in it: it depends only
   on j - i) and the padded keys masked (causal: by the causal mask alone, since they follow every
   real query of their segment). `packtune bench t5-attention` measures it against SDPA per segment
   (`varlen_relative_attention_ref`); docs/t5.md has the figures.

`varlen_relative_attention_ref` (SDPA per segment, a host loop) is the specification.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from packtune.kernels.segment_buckets import (
    gather_segments,
    length_buckets,
    padded_segment_index,
    real_rows,
    scatter_segments,
)


def t5_relative_buckets(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                        max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position), int64.

    Bidirectional (the encoder): half the buckets for keys after the query; causal (the decoder):
    keys after the query share bucket 0 (they are masked anyway). Of the buckets of one direction,
    the first half are exact distances, the rest logarithmic up to `max_distance`, beyond which all
    share the last. Computed with the float32 ops transformers uses, so every bucket is the same."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.int64) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.int64)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def relative_bias(table: torch.Tensor, max_seqlen: int, *, bidirectional: bool,
                  max_distance: int) -> torch.Tensor:
    """The bias `[H, 2 * max_seqlen - 1]` of a bucket table `[num_buckets, H]`: column r + max_seqlen - 1
    holds the bias of relative position r (a gather: gradients flow back into the table)."""
    relative = torch.arange(1 - max_seqlen, max_seqlen, device=table.device)
    buckets = t5_relative_buckets(relative, bidirectional=bidirectional, num_buckets=table.shape[0],
                                  max_distance=max_distance)
    return table[buckets].t()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, cu_seqlens: torch.Tensor,
           max_seqlen: int | None = None) -> None:
    if q.dim() != 3 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"varlen_relative_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} must be packed [T, H, D] of one shape")
    if bias.dim() != 2 or bias.shape[0] != q.shape[1] or bias.shape[1] % 2 == 0:
        raise ValueError(f"varlen_relative_attention: bias {tuple(bias.shape)} must be "
                         f"[H, 2 * max_seqlen - 1] with H = {q.shape[1]}")
    if max_seqlen is not None and bias.shape[1] != 2 * max_seqlen - 1:
        raise ValueError(f"varlen_relative_attention: bias covers relative positions up to "
                         f"{(bias.shape[1] - 1) // 2}, max_seqlen {max_seqlen} needs {max_seqlen - 1}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"varlen_relative_attention: cu_seqlens must be 1-D offsets [n+1], "
                         f"got {tuple(cu_seqlens.shape)}")


def bias_block(bias: torch.Tensor, lq: int, lk: int, dtype: torch.dtype) -> torch.Tensor:
    """The `[H, lq, lk]` bias of queries at positions `lk - lq .. lk - 1` (the last lq, as a KV-cache
    step's) over keys `0 .. lk - 1`, from `bias` `[H, 2 * L - 1]`."""
    center = (bias.shape[1] - 1) // 2
    i = torch.arange(lk - lq, lk, device=bias.device)[:, None]
    j = torch.arange(lk, device=bias.device)[None, :]
    return bias.index_select(1, (j - i + center).flatten()).view(-1, lq, lk).to(dtype)


def biased_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                allowed: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """SDPA on `[B, H, Lq, D]` with the float mask `bias` (broadcast to `[B, H, Lq, Lk]`), the
    entries `allowed` is False at set to the dtype's minimum (as transformers: no NaN rows)."""
    if allowed is not None:
        bias = torch.where(allowed, bias, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def varlen_relative_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                                  cu_seqlens: torch.Tensor, *, causal: bool,
                                  scale: float | None = None) -> torch.Tensor:
    """The specification: SDPA on each segment's own tokens with its `[H, L, L]` bias; tokens past
    cu_seqlens[-1] give zeros."""
    _check(q, k, v, bias, cu_seqlens)
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        n = end - start
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril() if causal else None
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        o = biased_sdpa(qs, ks, vs, bias_block(bias, n, n, q.dtype), allowed, scale)
        out[start:end] = o.transpose(0, 1)
    return out


def varlen_relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                              cu_seqlens: torch.Tensor, max_seqlen: int, *, causal: bool,
                              scale: float | None = None) -> torch.Tensor:
    """Attention within each segment of a packed row with a relative position bias:
    q, k, v `[T, H, D]` -> `[T, H, D]`.

    bias: `[H, 2 * max_seqlen - 1]` (see the module docstring; `relative_bias` builds T5's);
    cu_seqlens: int32 `[n+1]` segment offsets on q's device; max_seqlen: the longest segment, a host
    int; causal: the decoder's self-attention; scale: None for head_dim ** -0.5 (T5 uses 1.0).
    Rows past cu_seqlens[-1] come back as zeros.
    """
    _check(q, k, v, bias, cu_seqlens, max_seqlen)
    if q.device.type == "cuda":
        from packtune.kernels.flex_segment_attention import flex_segment_attention

        return flex_segment_attention(q, k, v, cu_seqlens, cu_seqlens, causal=causal, scale=scale, bias=bias)
    return bucketed_relative_attention(q, k, v, bias, cu_seqlens, causal=causal, scale=scale)


def bucketed_relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                                cu_seqlens: torch.Tensor, *, causal: bool,
                                scale: float | None) -> torch.Tensor:
    """The CPU path (any device): one SDPA call per length bucket (see the module docstring)."""
    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    if max(lengths) > (bias.shape[1] + 1) // 2:
        raise ValueError(f"varlen_relative_attention: a segment of {max(lengths)} tokens is longer than "
                         f"max_seqlen {(bias.shape[1] + 1) // 2}")
    parts, rows = [], []
    for bucket in length_buckets(lengths):
        longest = lengths[bucket[0]]
        index, real = padded_segment_index([starts[i] for i in bucket], [lengths[i] for i in bucket],
                                           q.device)
        qb, kb, vb = (gather_segments(t, index).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        # causal: a padded key sits after every real query of its segment, so the causal mask alone
        # hides it (one [L, L] mask for the bucket); otherwise the padded keys are masked per segment
        allowed = None
        if causal:
            allowed = torch.ones(longest, longest, dtype=torch.bool, device=q.device).tril()
        elif min(lengths[i] for i in bucket) < longest:
            allowed = real[:, None, None, :]
        o = biased_sdpa(qb, kb, vb, bias_block(bias, longest, longest, q.dtype)[None], allowed, scale)
        parts.append(real_rows(o.transpose(1, 2), real))
        rows.append(index[real])
    return scatter_segments(q, rows, parts)
