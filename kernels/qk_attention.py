"""Varlen attention with separate query and key offsets, causal aligned to the bottom right.

Query segment i (rows `cu_seqlens_q[i]` .. `cu_seqlens_q[i+1]` of q) attends to key segment i
(`cu_seqlens_k[i]` .. of k, v) and to nothing else. With `causal`, a segment's queries are its
last keys (flash-attn's bottom-right alignment): query j of lq sees keys 0 .. j + lk - lq, so the
last query sees every key, and a segment with lq == lk is plain causal attention. `window` counts
from there as in `varlen_attention` (query j sees the `window` keys up to j + lk - lq), `softcap`
caps the logits; GQA: k, v may have fewer heads than q. Without `causal` and `window` it is
cross-attention (an encoder-decoder's decoder over its encoder).

Prefix sharing (packtune.preference) is the causal case over gathered keys: a packed row holds a
prompt once, then the chosen response, then the rejected one; the rejected response's segment
attends to the prompt's keys and its own (`GatheredKeys` in kernels/packed_layout.py says which
rows), its positions continuing after the prompt. `gathered_key_attention` gathers those keys
and calls `varlen_qk_attention`; autograd's index backward adds the prompt keys' two gradients
(on CUDA by a sorting index_put, deterministic).

Paths, chosen per call as `varlen_attention` chooses (kernels/attention.py):

1. flash-attn's `flash_attn_varlen_func` (CUDA fp16/bf16, when installed): separate offsets,
   bottom-right causality, windows, softcap;
2. torch's `varlen_attn` (CUDA fp16/bf16) with `cu_seq_k`, which runs PyTorch's flash kernel
   (bottom-right, as flash-attn), when its signature can express the window and scale;
3. segment buckets, any device and dtype (the CPU path): segments sorted by key length, cut into
   buckets padded within `BUCKET_WASTE` x their real query-key products, one batched SDPA call per
   bucket with an explicit mask (real keys, bottom-right causality, the window); padded queries
   are computed and dropped. Exact.

`varlen_qk_attention_ref` (SDPA per segment with the explicit mask, a host loop) is the
specification. Rows of q past cu_seqlens_q[-1] come back as zeros, with zero gradients, as do the
gradients of k, v rows past cu_seqlens_k[-1].
"""

from __future__ import annotations

import torch

from packtune.kernels.attention import (
    _flash_attn,
    _torch_varlen,
    _window_size,
    attention_path,
    call_torch_varlen,
    sdpa_attention,
    zero_tail,
)
from packtune.kernels.packed_layout import GatheredKeys
from packtune.kernels.segment_buckets import (
    BUCKET_WASTE,
    gather_segments,
    padded_segment_index,
    real_rows,
    scatter_segments,
)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"varlen_qk_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be packed [T, H, D] with one head size, k and v of one shape")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_qk_attention: {q.shape[1]} query heads are not a multiple of "
                         f"{k.shape[1]} kv heads")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"varlen_qk_attention: {name} must be 1-D offsets [n+1], got {tuple(cu.shape)}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"varlen_qk_attention: {cu_q.numel() - 1} query segments but {cu_k.numel() - 1} key "
                         "segments; segment i attends to segment i")


def segment_mask(lq: int, lk: int, causal: bool, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean `[lq, lk]` mask (True = attend) of one segment, its queries the last lq of lk keys."""
    i = torch.arange(lk - lq, lk, device=device)[:, None]  # each query's place among the keys
    j = torch.arange(lk, device=device)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j < window) & (j - i < window)
    return allowed


def varlen_qk_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, *, causal: bool = True, window: int | None = None,
                            scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """The specification: SDPA of each query segment over its key segment, the mask explicit."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    out = torch.zeros_like(q)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for qs, qe, ks, ke in zip(bq[:-1], bq[1:], bk[:-1], bk[1:], strict=True):
        if qe <= qs:
            continue
        if ke - ks < (qe - qs if causal else 1):
            raise ValueError(f"varlen_qk_attention: query segment {qs}..{qe} has {ke - ks} keys; it needs at "
                             f"least {'as many as its queries' if causal else 'one'}")
        mask = segment_mask(qe - qs, ke - ks, causal, window, q.device)
        qs_, ks_, vs_ = (t.transpose(0, 1) for t in (q[qs:qe], k[ks:ke], v[ks:ke]))
        o = sdpa_attention(qs_, ks_, vs_, attn_mask=mask, is_causal=False, scale=scale, softcap=softcap,
                           enable_gqa=q.shape[1] != k.shape[1])
        out[qs:qe] = o.transpose(0, 1)
    return out


def varlen_qk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                        causal: bool = True, window: int | None = None, scale: float | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Query segment i of q `[Tq, Hq, D]` attends to key segment i of k, v `[Tk, Hk, D]` -> `[Tq, Hq, D]`.

    cu_seqlens_q / cu_seqlens_k: int32 `[n+1]` offsets on q's device; max_seqlen_q / max_seqlen_k:
    the longest segments (host ints, upper bounds). Causal segments need at least as many keys as
    queries. See the module docstring for the alignment, `window` and `softcap`.
    """
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if window is not None and window < 1:
        raise ValueError(f"varlen_qk_attention: window must be >= 1 or None, got {window}")
    path = attention_path(q.device, q.dtype, window=window, scale=scale, logit_mods=softcap is not None)
    if path not in ("flash_attn", "torch_varlen"):  # buckets (and FlexAttention's setups: buckets too)
        return _bucketed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, window=window, scale=scale,
                         softcap=softcap)
    cu_q, cu_k = (cu.to(device=q.device, dtype=torch.int32) for cu in (cu_seqlens_q, cu_seqlens_k))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        q, k, v = _ZeroTails.apply(cu_q, cu_k, q, k, v)
    if path == "flash_attn":
        out = _flash_attn().flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                                   softmax_scale=scale, causal=causal,
                                                   window_size=_window_size(causal, window),
                                                   **({} if softcap is None else {"softcap": softcap}))
        return zero_tail(out, cu_q)
    out = call_torch_varlen(_torch_varlen(), q, k, v, cu_q, max_seqlen_q, causal=causal, window=window,
                            scale=scale, cu_k=cu_k, max_seqlen_k=max_seqlen_k)
    return zero_tail(out, cu_q)


def gathered_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, keys: GatheredKeys, *, window: int | None = None,
                           scale: float | None = None, softcap: float | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a packed row's query segments (`cu_seqlens`) over the keys `keys` gathers
    from the same row: `[T, Hq, D]` q, `[T, Hk, D]` k, v -> `[T, Hq, D]`. Attention sinks (gpt-oss)
    are not supported here: `sinks` must be None."""
    if sinks is not None:
        raise ValueError("gathered_key_attention: attention sinks are not supported with shared prefixes")
    return varlen_qk_attention(q, k[keys.index], v[keys.index], cu_seqlens, keys.cu_seqlens_k, max_seqlen,
                               keys.max_seqlen_k, causal=True, window=window, scale=scale, softcap=softcap)


class _ZeroTails(torch.autograd.Function):
    """(q, k, v) unchanged, their gradients with the rows past cu_seqlens_q[-1] (q) and
    cu_seqlens_k[-1] (k, v) zeroed: the varlen kernels' backward leaves those rows unwritten."""

    @staticmethod
    def forward(ctx, cu_q: torch.Tensor, cu_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor):
        ctx.save_for_backward(cu_q, cu_k)
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        cu_q, cu_k = ctx.saved_tensors
        tail = lambda g, cu: None if g is None else zero_tail(g, cu)
        return None, None, tail(dq, cu_q), tail(dk, cu_k), tail(dv, cu_k)


def qk_buckets(q_lengths: list[int], k_lengths: list[int], waste: float = BUCKET_WASTE) -> list[list[int]]:
    """Segment indices grouped by falling key length; a group padded to its longest query and key
    segment holds at most `waste` x its real query-key products. Segments without queries are left out."""
    with_queries = (i for i, n in enumerate(q_lengths) if n > 0)
    order = sorted(with_queries, key=lambda i: (-k_lengths[i], -q_lengths[i]))
    buckets: list[list[int]] = []
    real = longest_q = 0
    for i in order:
        if buckets:
            grown_q, grown_real = max(longest_q, q_lengths[i]), real + q_lengths[i] * k_lengths[i]
            if (len(buckets[-1]) + 1) * grown_q * k_lengths[buckets[-1][0]] <= waste * grown_real:
                buckets[-1].append(i)
                real, longest_q = grown_real, grown_q
                continue
        buckets.append([i])
        real, longest_q = q_lengths[i] * k_lengths[i], q_lengths[i]
    return buckets


def _bucketed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, *,
              causal: bool, window: int | None, scale: float | None, softcap: float | None) -> torch.Tensor:
    bq, bk = cu_q.tolist(), cu_k.tolist()
    q_lengths = [e - s for s, e in zip(bq[:-1], bq[1:], strict=True)]
    k_lengths = [e - s for s, e in zip(bk[:-1], bk[1:], strict=True)]
    short = [i for i, (nq, nk) in enumerate(zip(q_lengths, k_lengths, strict=True))
             if nq > 0 and nk < (nq if causal else 1)]
    if short:
        raise ValueError(f"varlen_qk_attention: query segment {short[0]} has {k_lengths[short[0]]} keys for "
                         f"{q_lengths[short[0]]} queries")
    parts, rows = [], []
    for bucket in qk_buckets(q_lengths, k_lengths):
        queries, keys = [q_lengths[i] for i in bucket], [k_lengths[i] for i in bucket]
        q_index, q_real = padded_segment_index([bq[i] for i in bucket], queries, q.device)
        k_index, k_real = padded_segment_index([bk[i] for i in bucket], keys, q.device)
        if causal or window is not None:
            mask = _bucket_mask(queries, keys, q_real, k_real, causal, window)
        else:  # cross-attention: every query sees its segment's real keys, so no row is left without one
            mask = None if min(keys) == max(keys) else k_real[:, None, None, :]
        qb = gather_segments(q, q_index).transpose(1, 2)  # [B, H, Lq, D]
        kb, vb = (gather_segments(t, k_index).transpose(1, 2) for t in (k, v))  # [B, Hk, Lk, D]
        o = sdpa_attention(qb, kb, vb, attn_mask=mask, is_causal=False, scale=scale, softcap=softcap,
                           enable_gqa=q.shape[1] != k.shape[1])
        parts.append(real_rows(o.transpose(1, 2), q_real))
        rows.append(q_index[q_real])
    return scatter_segments(q, rows, parts)


def _bucket_mask(queries: list[int], keys: list[int], q_real: torch.Tensor, k_real: torch.Tensor,
                 causal: bool, window: int | None) -> torch.Tensor:
    """`[B, 1, Lq, Lk]` (True = attend) of a bucket's padded segments: real keys, bottom-right causality,
    the window; a padded query (dropped afterwards) sees one key, so no row of the softmax is empty."""
    device = q_real.device
    lq = torch.tensor(queries, device=device)[:, None, None]
    lk = torch.tensor(keys, device=device)[:, None, None]
    i = torch.arange(q_real.shape[1], device=device)[None, :, None] + lk - lq  # each query's place among keys
    j = torch.arange(k_real.shape[1], device=device)[None, None, :]
    mask = k_real[:, None, :].expand(-1, q_real.shape[1], -1)  # [B, Lq, Lk]
    if causal:
        mask = mask & (j <= i)
    if window is not None:
        mask = mask & (i - j < window) & (j - i < window)
    return (mask | (~q_real[:, :, None] & (j == 0)))[:, None]
