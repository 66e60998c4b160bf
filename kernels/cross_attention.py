"""Varlen cross-attention: the queries of segment i (one packed row, cut by `cu_seqlens_q`) attend to
the keys of segment i of another packed row (cut by `cu_seqlens_k`), and to nothing else.

An encoder-decoder's decoder attends to its encoder this way: decoder segment i is the target of
pair i, encoder segment i its input (kernels/seq2seq_layout.py). The attention is full (not causal)
and has no bias (T5's cross-attention has no position bias).

Paths, chosen per call (the same choice as `varlen_attention`'s, kernels/attention.py):

1. flash-attn's `flash_attn_varlen_func` (CUDA fp16/bf16, when installed), which takes separate
   query and key offsets;
2. torch's `varlen_attn` (CUDA fp16/bf16), which does too (`cu_seq_q`, `cu_seq_k`), when its
   signature on this torch can express the scale;
3. pair buckets, any device and dtype (the CPU path): pairs sorted by their key length, cut into
   buckets whose padded size (pairs x longest query x longest key) stays within `BUCKET_WASTE` x
   their real query-key products, one batched SDPA call per bucket with the padded keys masked;
   padded queries are computed and dropped.

`varlen_cross_attention_ref` (SDPA per pair, a host loop) is the specification. Rows past
cu_seqlens_q[-1] come back as zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packtune.kernels.attention import (
    BUCKET_WASTE,
    _flash_attn,
    _torch_varlen,
    attention_path,
    call_torch_varlen,
    gather_segments,
    padded_segment_index,
    real_rows,
    scatter_segments,
    zero_tail,
)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"varlen_cross_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} must be packed [T, H, D] with the same heads and head size, "
                         "k and v of one shape")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"varlen_cross_attention: {name} must be 1-D offsets [n+1], "
                             f"got {tuple(cu.shape)}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"varlen_cross_attention: {cu_q.numel() - 1} query segments but {cu_k.numel() - 1} "
                         "key segments; segment i attends to segment i")


def varlen_cross_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """The specification: SDPA of each query segment over its own key segment."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    out = torch.zeros_like(q)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for qs, qe, ks, ke in zip(bq[:-1], bq[1:], bk[:-1], bk[1:], strict=True):
        if qe <= qs:
            continue
        if ke <= ks:
            raise ValueError(f"varlen_cross_attention: query segment {qs}..{qe} has an empty key segment")
        o = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q[qs:qe], k[ks:ke], v[ks:ke])),
                                           scale=scale)
        out[qs:qe] = o.transpose(0, 1)
    return out


def varlen_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           scale: float | None = None) -> torch.Tensor:
    """Query segment i of q `[Tq, H, D]` attends to key segment i of k, v `[Tk, H, D]`: `[Tq, H, D]`.

    cu_seqlens_q / cu_seqlens_k: int32 `[n+1]` offsets on q's device (the same n); max_seqlen_q /
    max_seqlen_k: the longest segments, host ints; scale: None for head_dim ** -0.5 (T5 uses 1.0).
    Every segment with queries must have keys.
    """
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    path = attention_path(q.device, q.dtype, scale=scale)
    if path == "flash_attn":
        cu_q, cu_k = (cu.to(device=q.device, dtype=torch.int32) for cu in (cu_seqlens_q, cu_seqlens_k))
        out = _flash_attn().flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                                   softmax_scale=scale, causal=False)
        return zero_tail(out, cu_q)
    if path == "torch_varlen":
        cu_q, cu_k = (cu.to(device=q.device, dtype=torch.int32) for cu in (cu_seqlens_q, cu_seqlens_k))
        out = call_torch_varlen(_torch_varlen(), q, k, v, cu_q, max_seqlen_q, causal=False, window=None,
                                scale=scale, cu_k=cu_k, max_seqlen_k=max_seqlen_k)
        return zero_tail(out, cu_q)
    return _bucketed(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale)


def pair_buckets(q_lengths: list[int], k_lengths: list[int], waste: float = BUCKET_WASTE) -> list[list[int]]:
    """Pair indices grouped by falling key length; a group padded to its longest query and key holds
    at most `waste` x its real query-key products. Pairs without queries are left out."""
    with_queries = (i for i, n in enumerate(q_lengths) if n > 0)
    order = sorted(with_queries, key=lambda i: (-k_lengths[i], -q_lengths[i]))
    buckets: list[list[int]] = []
    real = longest_q = 0
    for i in order:
        if buckets:
            grown_q = max(longest_q, q_lengths[i])
            grown_real = real + q_lengths[i] * k_lengths[i]
            if (len(buckets[-1]) + 1) * grown_q * k_lengths[buckets[-1][0]] <= waste * grown_real:
                buckets[-1].append(i)
                real, longest_q = grown_real, grown_q
                continue
        buckets.append([i])
        real, longest_q = q_lengths[i] * k_lengths[i], q_lengths[i]
    return buckets


def _bucketed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, *,
              scale: float | None) -> torch.Tensor:
    bq, bk = cu_q.tolist(), cu_k.tolist()
    q_lengths = [e - s for s, e in zip(bq[:-1], bq[1:], strict=True)]
    k_lengths = [e - s for s, e in zip(bk[:-1], bk[1:], strict=True)]
    empty = [i for i, (nq, nk) in enumerate(zip(q_lengths, k_lengths, strict=True)) if nq > 0 and nk == 0]
    if empty:
        raise ValueError(f"varlen_cross_attention: query segment {empty[0]} has an empty key segment")
    parts, rows = [], []
    for bucket in pair_buckets(q_lengths, k_lengths):
        q_index, q_real = padded_segment_index([bq[i] for i in bucket], [q_lengths[i] for i in bucket],
                                               q.device)
        keys = [k_lengths[i] for i in bucket]
        k_index, k_real = padded_segment_index([bk[i] for i in bucket], keys, q.device)
        qb = gather_segments(q, q_index).transpose(1, 2)  # [B, H, Lq, D]
        kb, vb = (gather_segments(t, k_index).transpose(1, 2) for t in (k, v))  # [B, H, Lk, D]
        mask = None if min(keys) == max(keys) else k_real[:, None, None, :]
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        parts.append(real_rows(o.transpose(1, 2), q_real))
        rows.append(q_index[q_real])
    return scatter_segments(q, rows, parts)

