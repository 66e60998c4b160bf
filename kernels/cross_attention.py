"""Varlen cross-attention: the queries of segment i (one packed row, cut by `cu_seqlens_q`) attend to
the keys of segment i of another packed row (cut by `cu_seqlens_k`), and to nothing else.

An encoder-decoder's decoder attends to its encoder this way: decoder segment i is the target of
pair i, encoder segment i its input (kernels/seq2seq_layout.py). The attention is full (not causal)
and has no bias (T5's cross-attention has no position bias): `varlen_qk_attention` without
causality (kernels/qk_attention.py), whose paths it takes: flash-attn's `flash_attn_varlen_func`
and torch's `varlen_attn` on CUDA (fp16 / bf16), segment buckets on any device (the CPU path; for
cross-attention a bucket needs no mask when its key segments are of one length, else only the padded
keys are masked).

`varlen_cross_attention_ref` (SDPA per pair, a host loop) is the specification. Rows past
cu_seqlens_q[-1] come back as zeros.
"""

from __future__ import annotations

import torch

from packtune.kernels.qk_attention import varlen_qk_attention, varlen_qk_attention_ref


def varlen_cross_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """The specification: SDPA of each query segment over its own key segment."""
    return varlen_qk_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, scale=scale)


def varlen_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           scale: float | None = None) -> torch.Tensor:
    """Query segment i of q `[Tq, H, D]` attends to key segment i of k, v `[Tk, H, D]`: `[Tq, H, D]`.

    cu_seqlens_q / cu_seqlens_k: int32 `[n+1]` offsets on q's device (the same n); max_seqlen_q /
    max_seqlen_k: the longest segments, host ints; scale: None for head_dim ** -0.5 (T5 uses 1.0).
    Every segment with queries must have keys.
    """
    return varlen_qk_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                               scale=scale)
