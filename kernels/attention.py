"""Variable-length (packed) causal attention: one call over `[T, H, D]` rows holding many samples.

Four paths, chosen per call, best first:

1. `flash_attn.flash_attn_varlen_func`, when flash-attn imports and q/k/v are CUDA fp16/bf16;
2. FlexAttention (kernels/flex_attention.py), on CUDA for a logit softcap or ALiBi without
   flash-attn: the cap and the bias inside the kernel, a block mask from `cu_seqlens`, no host sync;
3. `torch.nn.attention.varlen.varlen_attn`, on CUDA fp16/bf16 whenever this torch has it. Its
   signature moved: `enable_gqa` is passed where it exists (PyTorch >= 2.12), otherwise the kv
   heads are expanded to the query heads; `window_size` where it exists, otherwise `is_causal`
   (and a sliding-window call takes path 4); a custom `scale` only where `scale` exists;
4. length buckets (segment_buckets.py), on any device and dtype (the CPU path): samples sorted by
   length and cut into buckets whose padding to the bucket's longest costs at most `BUCKET_WASTE` x
   their real tokens; one batched scaled_dot_product_attention call per bucket. A padded key sits after
   every real query of its sample, so the causal mask alone hides it (windows and non-causal
   calls get an explicit mask); padded queries are computed and dropped. Exact, and a row of 32
   short samples costs a few SDPA calls instead of 32.

`varlen_attention_ref` (SDPA per sample, a host loop) is the specification the tests hold every
path to: no token ever attends across a `cu_seqlens` boundary, and rows past `cu_seqlens[-1]`
come back as zeros, with zero gradients (the fast paths leave those rows of the output and of
dq, dk, dv unwritten, so both are zeroed with a device-side mask: no host sync).

`window` follows transformers' Mistral semantics: query i sees key j when 0 <= i - j < window
(the token itself and the window - 1 before it), i.e. flash-attn's `window_size=(window - 1, 0)`;
without `causal`, |i - j| < window.
GQA: k/v may have fewer heads than q (Hq a multiple of Hk). flash-attn is imported only when a
call needs it, never at module import.

`softcap` (Gemma 2) caps the scaled logits as softcap * tanh(logits / softcap) before the mask and
softmax: flash-attn's `softcap`, FlexAttention's score_mod on other CUDA setups; torch's
varlen_attn and SDPA have none, so on the CPU such calls take the buckets path with the logits
written out, as transformers' eager attention.

`sinks` (gpt-oss) is a learned logit per query head that joins every softmax's denominator and
attends to nothing: out = softmax([logits, sink]) @ [v; 0] = out_without * sigmoid(lse - sink), lse
the log-sum-exp of the row's (masked) logits. flash-attn 2, torch's varlen_attn and the
FlexAttention path return no differentiable lse here, so such calls take the buckets path with the
logits written out (transformers' eager attention, the sink as an extra column).

`alibi_slopes` (BLOOM) adds slope_h * (j - i) to the logits of query i and key j, i and j being
positions within the sample, so no bias crosses a sample boundary: flash-attn's `alibi_slopes`
(the same bias), FlexAttention's score_mod (fp32) on other CUDA setups, and on the CPU the
buckets path with the biases as SDPA's float mask. transformers' BLOOM adds slope_h * j instead:
within a causal softmax the two differ by a constant per row, so the probabilities are the same (and slope * j
at long positions loses precision in bf16, where j - i near the diagonal does not).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
from types import ModuleType

import torch
import torch.nn.functional as F

from packtune.kernels.flex_attention import flex_varlen_attention
from packtune.kernels.segment_buckets import (
    gather_segments,
    length_buckets,
    padded_segment_index,
    real_rows,
    scatter_segments,
)


@functools.cache
def _flash_attn() -> ModuleType | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.import_module("flash_attn")
    except (ImportError, OSError, RuntimeError) as e:  # installed but built for another torch/CUDA
        from packtune.kernels._dispatch import broken_import

        broken_import("flash_attn", e)
        return None


@functools.cache
def _torch_varlen():
    """torch's `varlen_attn`, whichever signature this torch gives it; None where it is missing."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _params(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def torch_varlen_supports(fn, *, window: int | None = None, scale: float | None = None) -> bool:
    """Whether this `varlen_attn` signature can express the call (GQA always can: kv heads expand)."""
    params = _params(fn)
    if window is not None and "window_size" not in params:
        return False
    if "window_size" not in params and "is_causal" not in params:
        return False
    return scale is None or "scale" in params


@functools.cache
def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def attention_path(device: torch.device | str, dtype: torch.dtype, *, window: int | None = None,
                   scale: float | None = None, logit_mods: bool = False) -> str:
    """Which implementation `varlen_attention` uses for tensors of this device and dtype (and, for
    torch's `varlen_attn`, whether its signature on this torch can express the window and scale);
    `logit_mods`: the call caps the logits or adds ALiBi biases."""
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and _flash_attn() is not None:
        return "flash_attn"
    if logit_mods:
        return "flex" if device.type == "cuda" and _has_flex() else "buckets"
    varlen = _torch_varlen()
    if device.type == "cuda" and half and varlen is not None and torch_varlen_supports(varlen, window=window,
                                                                                        scale=scale):
        return "torch_varlen"
    return "buckets"


def describe_attention_paths() -> str:
    """One line for `packtune env`: the attention path for CPU tensors and for CUDA bf16 tensors."""
    names = {"flash_attn": "flash-attn varlen", "torch_varlen": "torch varlen_attn",
             "buckets": "SDPA over length buckets", "flex": "FlexAttention"}
    cuda = names[attention_path("cuda", torch.bfloat16)]
    varlen = _torch_varlen()
    if _flash_attn() is None and varlen is None:
        cuda += " (no flash-attn, no torch varlen_attn)"
    elif _flash_attn() is None:
        params = _params(varlen)
        notes = ["GQA native" if "enable_gqa" in params else "GQA by expanding kv heads"]
        if "window_size" not in params:
            notes.append("sliding windows: SDPA over length buckets")
        if "scale" not in params:
            notes.append("custom scale: SDPA over length buckets")
        cuda += f" ({'; '.join(notes)})"
    if _flash_attn() is None:
        cuda += f"; softcap / ALiBi: {names[attention_path('cuda', torch.bfloat16, logit_mods=True)]}"
    return f"CPU: {names[attention_path('cpu', torch.float32)]}; CUDA bf16: {cuda}"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0]:
        raise ValueError(f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must "
                         "be packed [T, H, D] with the same T, and k, v of one shape")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: {q.shape[1]} query heads are not a multiple of "
                         f"{k.shape[1]} kv heads")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"varlen_attention: cu_seqlens must be 1-D offsets [n+1], "
                         f"got {tuple(cu_seqlens.shape)}")


def sample_mask(length: int, causal: bool, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean `[L, L]` mask (True = attend) for one sample, or None for full attention."""
    if not causal and window is None:
        return None
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j < window) & (j - i < window)
    return allowed


def alibi_head_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi's fp32 slope per head, as transformers' BLOOM builds them (`_get_alibi_slopes`): the
    geometric sequence 2^(-8 h / n) for the largest power of two n <= num_heads, then every other
    term of the sequence for 2n to fill the remaining heads."""
    def powers(n: int, count: int, step: int) -> torch.Tensor:
        base = torch.full((), 2 ** (-(2 ** -(math.log2(n) - 3))), device=device, dtype=torch.float32)
        return torch.pow(base, torch.arange(1, 1 + step * count, step, device=device, dtype=torch.int32))

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(closest, closest, 1)
    if closest != num_heads:
        slopes = torch.cat([slopes, powers(2 * closest, min(closest, num_heads - closest), 2)])
    return slopes


def alibi_bias(slopes: torch.Tensor, lq: int, lk: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi biases `[H, lq, lk]`: slope_h * (j - i) for query i and key j, the queries being the
    last `lq` of the `lk` positions (flash-attn's bottom-right alignment: a KV-cache step's queries
    follow the cached keys). Computed in float64 from the positions, then cast to `dtype`."""
    i = torch.arange(lk - lq, lk, device=slopes.device, dtype=torch.float64)[:, None]
    j = torch.arange(lk, device=slopes.device, dtype=torch.float64)[None, :]
    return (slopes.double()[:, None, None] * (j - i)).to(dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None,
                   is_causal: bool, scale: float | None, softcap: float | None = None,
                   alibi_slopes: torch.Tensor | None = None, enable_gqa: bool = False,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on `[B, H, L, D]`, with the logits capped at `softcap`, ALiBi
    biases added (`alibi_slopes`, one per query head; see `alibi_bias`) and a sink logit per query
    head in the softmax (`sinks` `[H]`); without any, SDPA itself. The capped or sunk form is
    transformers' eager attention (input-dtype matmuls, softmax in fp32), with the softmax in float64
    for float64 input. ALiBi goes into SDPA as a float mask whose disallowed entries hold the dtype's
    minimum (as transformers' BLOOM: no NaN rows)."""
    if alibi_slopes is not None:
        lq, lk = q.shape[-2], k.shape[-2]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq) if is_causal else None
        if attn_mask is not None:
            allowed = attn_mask if allowed is None else attn_mask & allowed
        bias = alibi_bias(alibi_slopes.to(q.device), lq, lk, q.dtype)
        if allowed is not None:
            bias = torch.where(allowed, bias, torch.finfo(q.dtype).min)
        attn_mask, is_causal = bias, False
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    if enable_gqa:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-2, -1) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attn_mask, torch.finfo(logits.dtype).min)  # as transformers: no NaN rows
    elif attn_mask is not None:  # ALiBi biases, masked entries already at the minimum
        logits = logits + attn_mask
    compute = torch.promote_types(q.dtype, torch.float32)
    if sinks is None:
        return torch.softmax(logits, dim=-1, dtype=compute).to(q.dtype) @ v
    sink = sinks.to(logits.dtype)[:, None, None].expand(*logits.shape[:-1], 1)  # [.., H, L, 1]
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1, dtype=compute)[..., :-1]
    return probs.to(q.dtype) @ v


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                         causal: bool = True, window: int | None = None, scale: float | None = None,
                         softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                         sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The specification: SDPA on each sample's own tokens (ALiBi from the sample's own positions);
    tokens past cu_seqlens[-1] give zeros."""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        # Plain causal goes through is_causal (SDPA's fused CPU/GPU kernels); windows need the mask.
        mask = sample_mask(end - start, causal, window, q.device) if window is not None else None
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        o = sdpa_attention(qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                           softcap=softcap, alibi_slopes=alibi_slopes, enable_gqa=gqa, sinks=sinks)
        out[start:end] = o.transpose(0, 1)
    return out


def _window_size(causal: bool, window: int | None) -> tuple[int, int]:
    if window is None:
        return (-1, 0) if causal else (-1, -1)
    return (window - 1, 0) if causal else (window - 1, window - 1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, causal: bool = True, window: int | None = None,
                     scale: float | None = None, softcap: float | None = None,
                     alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Attention within each sample of a packed row: q `[T, Hq, D]`, k/v `[T, Hk, D]` -> `[T, Hq, D]`.

    cu_seqlens: int32 `[n+1]` sample offsets (on q's device); max_seqlen: the longest sample, a
    host int (so no device-to-host sync on the fast paths); window: sliding window (Mistral);
    softcap: logit cap (Gemma 2); alibi_slopes: fp32 `[Hq]` ALiBi slopes (BLOOM), the bias
    slope * (j - i) from each sample's own positions; sinks: `[Hq]` sink logits (gpt-oss).
    """
    _check(q, k, v, cu_seqlens)
    if window is not None and window < 1:
        raise ValueError(f"varlen_attention: window must be >= 1 or None, got {window}")
    path = attention_path(q.device, q.dtype, window=window, scale=scale,
                          logit_mods=softcap is not None or alibi_slopes is not None)
    if path == "buckets" or sinks is not None:  # no fast path here gives a differentiable lse for sinks
        return _bucketed_attention(q, k, v, cu_seqlens, causal=causal, window=window, scale=scale,
                                   softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        q, k, v = ZeroTailGrad.apply(cu, q, k, v)
    if path == "flex":
        out = flex_varlen_attention(q, k, v, cu, causal=causal, window=window, scale=scale, softcap=softcap,
                                    alibi_slopes=alibi_slopes)
        return zero_tail(out, cu)
    if path == "flash_attn":
        out = _flash_attn().flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen,
                                                   softmax_scale=scale, causal=causal,
                                                   window_size=_window_size(causal, window),
                                                   **({} if softcap is None else {"softcap": softcap}),
                                                   **({} if alibi_slopes is None
                                                      else {"alibi_slopes": alibi_slopes.float()}))
        return zero_tail(out, cu)
    out = call_torch_varlen(_torch_varlen(), q, k, v, cu, max_seqlen, causal=causal, window=window,
                            scale=scale)
    return zero_tail(out, cu)


def call_torch_varlen(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                      max_seqlen: int, *, causal: bool, window: int | None, scale: float | None,
                      cu_k: torch.Tensor | None = None, max_seqlen_k: int | None = None) -> torch.Tensor:
    """`fn` (a `varlen_attn`) called with the keywords its signature has (see `torch_varlen_supports`);
    keys segmented by `cu_k` / `max_seqlen_k` when they differ from the queries' `cu` / `max_seqlen`."""
    params = _params(fn)
    kwargs: dict = {}
    if "window_size" in params:
        kwargs["window_size"] = _window_size(causal, window)
    else:
        kwargs["is_causal"] = causal
    if scale is not None:
        kwargs["scale"] = scale
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # query head h reads kv head h // groups, as SDPA's enable_gqa
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu_k, max_seqlen_k = (cu, max_seqlen) if cu_k is None else (cu_k, max_seqlen_k)
    return fn(q, k, v, cu, cu_k, max_seqlen, max_seqlen_k, **kwargs)


class ZeroTailGrad(torch.autograd.Function):
    """(q, k, v) unchanged, whose gradients come back with the rows past cu_seqlens[-1] zeroed: the
    varlen kernels' backward never writes those rows of dq, dk, dv (whatever the memory held would
    flow into the weight gradients), and their true gradient is zero (`zero_tail` masks the output)."""

    @staticmethod
    def forward(ctx, cu_seqlens: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        ctx.save_for_backward(cu_seqlens)
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        (cu_seqlens,) = ctx.saved_tensors
        return None, *(None if g is None else zero_tail(g, cu_seqlens) for g in (dq, dk, dv))


def zero_tail(out: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`out` with the rows past cu_seqlens[-1] (never written by the varlen kernels) set to zero,
    through a device-side comparison: no host sync."""
    rows = torch.arange(out.shape[0], device=out.device)
    return out.masked_fill((rows >= cu_seqlens[-1])[:, None, None], 0.0)


def _bucketed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                        causal: bool, window: int | None, scale: float | None,
                        softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    parts, rows = [], []
    for bucket in length_buckets(lengths):
        longest = lengths[bucket[0]]
        index, real = padded_segment_index([starts[i] for i in bucket], [lengths[i] for i in bucket],
                                           q.device)
        qb, kb, vb = (gather_segments(t, index).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        mask = None
        if window is not None or not causal:
            mask = real[:, None, None, :]  # [B, 1, 1, L]: real keys only
            within = sample_mask(longest, causal, window, q.device)
            mask = mask if within is None else mask & within
        o = sdpa_attention(qb, kb, vb, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                           softcap=softcap, alibi_slopes=alibi_slopes, enable_gqa=q.shape[1] != k.shape[1],
                           sinks=sinks)
        parts.append(real_rows(o.transpose(1, 2), real))
        rows.append(index[real])
    return scatter_segments(q, rows, parts)
