"""Packed (varlen) attention through PyTorch's FlexAttention: the CUDA path for Gemma 2's logit cap
and BLOOM's ALiBi where flash-attn is not installed (torch's varlen_attn has neither).

One FlexAttention call covers the whole packed row as one `[1, H, T, D]` sequence (views of the
`[T, H, D]` q, k, v), with

- a block mask built on the device from `cu_seqlens` (`document_block_mask`): for each pair of
  128-token query and key blocks, whether any of its pairs may attend (the same sample, causal,
  within the window) and whether all of them may (no per-element mask there). Block-level
  tensors only ([T / 128]^2 flags): no [T, T] mask, no host sync. Tokens past cu_seqlens[-1]
  attend nothing: their outputs and gradients are zero;
- a `score_mod` that caps the scaled logits (softcap * tanh(s / softcap)) and adds the ALiBi bias
  slope_h * (j - i) (fp32 slopes, i and j positions in the row: equal to the positions in the
  sample wherever the mask allows), inside the kernel: the [H, T, T] logits never exist in memory.

On CUDA FlexAttention runs compiled (torch.compile writes its fused Triton kernels; the first
call compiles, and automatic dynamic shapes keep later row lengths from recompiling). Elsewhere it
runs eagerly, forward only on the CPU in torch 2.13 (the CPU tests check the masks and score mods
with it; the CPU training path stays attention.py's buckets). The block mask of a `cu_seqlens`
tensor is built once and reused by every layer of the step (cached weakly on the tensor).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

BLOCK = 128
"""FlexAttention's sparse block (query and key tokens per block-mask entry)."""

_MASKS = WeakIdKeyDictionary()
"""cu_seqlens tensor -> {(its version, T, causal, window): BlockMask}."""


def _block_flags(doc: torch.Tensor, total: int, samples: int, causal: bool, window: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """([nb, nb] any-allowed, [nb, nb] all-allowed) over query blocks (rows) and key blocks (columns)
    of `total` tokens; `doc` holds each token's sample, `samples` (past the last) past the end."""
    starts = torch.arange(0, total, BLOCK, device=doc.device)
    ends = torch.clamp(starts + BLOCK, max=total) - 1
    first, last = doc[starts], doc[ends]  # doc is non-decreasing: each block's sample range
    q_first, q_last, q_start, q_end = first[:, None], last[:, None], starts[:, None], ends[:, None]
    k_first, k_last, k_start, k_end = first[None, :], last[None, :], starts[None, :], ends[None, :]
    shared = torch.maximum(q_first, k_first)  # the first sample both blocks hold, if any
    any_ok = (shared <= torch.minimum(q_last, k_last)) & (shared < samples)
    all_ok = (q_first == q_last) & (k_first == k_last) & (q_first == k_first) & (q_first < samples)
    if causal:
        any_ok &= k_start <= q_end
        all_ok &= k_end <= q_start
    if window is not None:  # |i - j| < window (and i - j >= 0 when causal, above)
        any_ok &= k_end > q_start - window
        all_ok &= q_end - k_start < window
        if not causal:
            any_ok &= k_start < q_end + window
            all_ok &= k_end - q_start < window
    return any_ok, all_ok


def _ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's (count per row [1, 1, nb], the flagged column indices first [1, 1, nb, nb])."""
    flags = flags.to(torch.int32)[None, None]
    order = torch.argsort(flags, dim=-1, descending=True, stable=True)
    return flags.sum(-1).to(torch.int32), order.to(torch.int32)


def document_block_mask(cu_seqlens: torch.Tensor, total: int, *, causal: bool, window: int | None):
    """FlexAttention's BlockMask for a packed row of `total` tokens whose samples `cu_seqlens`
    bounds: token i sees token j in the same sample when j <= i (causal) and |i - j| < window."""
    from torch.nn.attention.flex_attention import BlockMask

    samples = cu_seqlens.numel() - 1
    # Every token of the last block, padding included (the mask_mod may read it): `samples` past the end.
    tokens = torch.arange(-(-total // BLOCK) * BLOCK, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    doc = torch.searchsorted(cu_seqlens, tokens, right=True) - 1

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (doc[q_idx] == doc[kv_idx]) & (doc[q_idx] < samples)
        if causal:
            allowed &= kv_idx <= q_idx
        if window is not None:
            allowed &= (q_idx - kv_idx < window) & (kv_idx - q_idx < window)
        return allowed

    any_ok, all_ok = _block_flags(doc, total, samples, causal, window)
    partial_count, partial_index = _ordered(any_ok & ~all_ok)
    full_count, full_index = _ordered(all_ok)
    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(total, total))


def _cached_block_mask(cu_seqlens: torch.Tensor, total: int, causal: bool, window: int | None):
    if torch.compiler.is_compiling():  # traced into the graph instead (block-level ops: cheap)
        return document_block_mask(cu_seqlens, total, causal=causal, window=window)
    per_tensor = _MASKS.setdefault(cu_seqlens, {})
    key = (cu_seqlens._version, total, causal, window)
    if key not in per_tensor:
        per_tensor.clear()  # another version or row length: the older masks are stale
        per_tensor[key] = document_block_mask(cu_seqlens, total, causal=causal, window=window)
    return per_tensor[key]


def score_mod_for(softcap: float | None, alibi_slopes: torch.Tensor | None):
    """The logit modification: cap, then add the ALiBi bias (transformers' order); None for neither."""
    if softcap is None and alibi_slopes is None:
        return None
    slopes = None if alibi_slopes is None else alibi_slopes.float()

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score + slopes[h] * (kv_idx - q_idx)
        return score

    return score_mod


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                          causal: bool, window: int | None, scale: float | None, softcap: float | None,
                          alibi_slopes: torch.Tensor | None) -> torch.Tensor:
    """Attention within each sample of a packed row (q `[T, Hq, D]`, k/v `[T, Hk, D]` -> `[T, Hq, D]`)
    through FlexAttention; rows past cu_seqlens[-1] give zeros."""
    from torch.nn.attention.flex_attention import flex_attention

    total = q.shape[0]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if cu is not cu_seqlens:  # a converted copy is a new tensor per call: build, do not cache
        block_mask = document_block_mask(cu, total, causal=causal, window=window)
    else:
        block_mask = _cached_block_mask(cu, total, causal, window)
    attend = _compiled_flex() if q.device.type == "cuda" else flex_attention
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D] views
    out = attend(q4, k4, v4, score_mod=score_mod_for(softcap, alibi_slopes), block_mask=block_mask,
                 scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)
