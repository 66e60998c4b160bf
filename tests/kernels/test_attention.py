import math

import pytest
import torch

from packtune.kernels import varlen_attention
from packtune.kernels.attention import attention_path, describe_attention_paths, varlen_attention_ref
from packtune.kernels.segment_buckets import length_buckets


def _packed(lengths, hq=4, hk=4, d=32, dtype=torch.float64, device="cpu"):
    t = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(t, hq, d, dtype=dtype, device=device)
    k, v = (torch.randn(t, hk, d, dtype=dtype, device=device) for _ in range(2))
    return q, k, v, cu, max(lengths)


def _naive(q, k, v, causal=True, window=None, scale=None, softcap=None):
    """Attention of one sample written out in float64: scores, mask, softmax, weighted sum."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i, j = torch.arange(q.shape[0])[:, None], torch.arange(q.shape[0])[None]
    allowed = torch.ones_like(scores[0], dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j).abs() < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v.double())


def test_cpu_uses_length_buckets_and_env_line_names_it():
    assert attention_path("cpu", torch.bfloat16) == "buckets"
    assert describe_attention_paths().startswith("CPU: SDPA over length buckets; CUDA bf16: ")


def test_length_buckets_bound_the_padding():
    lengths = [40, 3, 0, 38, 17, 16, 1, 39, 15]
    buckets = length_buckets(lengths, waste=1.25)
    assert sorted(i for b in buckets for i in b) == [i for i, n in enumerate(lengths) if n]
    for b in buckets:
        assert lengths[b[0]] == max(lengths[i] for i in b)
        assert lengths[b[0]] * len(b) <= 1.25 * sum(lengths[i] for i in b)
    assert buckets == [[0, 7, 3, 4], [5, 8], [1], [6]]  # 40, 39, 38 and 17 share one call
    assert length_buckets([]) == [] and length_buckets([0, 0]) == []


@pytest.mark.parametrize("causal,window", [(True, None), (True, 4), (False, None), (False, 3)])
def test_buckets_equal_the_reference_values_and_gradients(causal, window):
    """Many samples of mixed lengths (several per bucket, empty ones, GQA), float64, against the
    per-sample specification; the output past cu_seqlens[-1] stays zero."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 30, (40,), generator=gen).tolist()
    q, k, v, cu, max_len = _packed(lengths, hq=4, hk=2, d=8)
    tail = 3
    q, k, v = (torch.cat([t, torch.randn(tail, *t.shape[1:], dtype=t.dtype)]) for t in (q, k, v))
    w = torch.randn(q.shape, dtype=q.dtype)
    results = []
    for fn in (varlen_attention, varlen_attention_ref):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        kwargs = {"causal": causal, "window": window, "scale": 0.7}
        out = fn(*ins, cu, max_len, **kwargs) if fn is varlen_attention else fn(*ins, cu, **kwargs)
        (out * w).sum().backward()
        results.append((out.detach(), *(t.grad for t in ins)))
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(results[0][0][-tail:], torch.zeros_like(q[-tail:]))


@pytest.mark.parametrize("hk", [4, 2, 1])
@pytest.mark.parametrize("window", [None, 3])
def test_packed_equals_per_sample_attention(hk, window):
    lengths = [1, 9, 1, 14, 4]
    q, k, v, cu, max_len = _packed(lengths, hq=4, hk=hk)
    out = varlen_attention(q, k, v, cu, max_len, window=window)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        expected = _naive(q[s:e], k[s:e], v[s:e], window=window)
        torch.testing.assert_close(out[s:e], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 3])
def test_softcap_packed_equals_per_sample_naive_values_and_gradients(window):
    """Gemma 2's logit cap on the buckets path and the reference, GQA, float64."""
    lengths = [1, 9, 14, 4, 9]
    q, k, v, cu, max_len = _packed(lengths, hq=4, hk=2, d=8)
    q = q * 3  # logits well beyond the cap
    results = []
    for fn in (varlen_attention, varlen_attention_ref, None):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        if fn is None:
            parts = [_naive(*(t[s:e] for t in ins), window=window, scale=0.5, softcap=2.0)
                     for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
            out = torch.cat(parts)
        else:
            args = (cu, max_len) if fn is varlen_attention else (cu,)
            out = fn(*ins, *args, window=window, scale=0.5, softcap=2.0)
        (out * torch.arange(out.numel(), dtype=out.dtype).view(out.shape).cos()).sum().backward()
        results.append((out.detach(), *(t.grad for t in ins)))
    for got, ref in zip(results[0], results[2], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for got, ref in zip(results[1], results[2], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_non_causal_and_scale():
    q, k, v, cu, max_len = _packed([5, 7], hq=2, hk=1, d=16)
    out = varlen_attention(q, k, v, cu, max_len, causal=False, window=4, scale=0.3)
    torch.testing.assert_close(out[5:], _naive(q[5:], k[5:], v[5:], causal=False, window=4, scale=0.3))


def test_sliding_window_matches_transformers_mask():
    from transformers.masking_utils import sliding_window_causal_mask_function

    q, k, v, cu, max_len = _packed([12], hq=2, hk=2, d=8)
    mask_fn = sliding_window_causal_mask_function(4)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None]
    mask = mask_fn(torch.tensor(0), torch.tensor(0), i, j)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, max_len, window=4), expected)


def test_changing_one_sample_never_touches_another():
    lengths = [5, 8, 3, 6]
    q, k, v, cu, max_len = _packed(lengths, hq=4, hk=2)
    w = torch.randn(q.shape, dtype=q.dtype)

    def run(q, k, v):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = varlen_attention(q, k, v, cu, max_len)
        (out * w).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    base = run(q, k, v)
    s, e = cu[1].item(), cu[2].item()  # rewrite sample 1 entirely
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[s:e] = torch.randn_like(t[s:e]) * 5
    changed = run(q2, k2, v2)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[s:e] = False
    for a, b in zip(base, changed, strict=True):
        assert torch.equal(a[others], b[others])
        assert not torch.equal(a[s:e], b[s:e])


def test_gradients_match_naive():
    q, k, v, cu, max_len = _packed([3, 10], hq=4, hk=2, d=16)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    varlen_attention(*ins, cu, max_len, window=5).pow(2).sum().backward()
    for s, e in ((0, 3), (3, 13)):
        ref_ins = [t[s:e].clone().requires_grad_() for t in (q, k, v)]
        _naive(*ref_ins, window=5).pow(2).sum().backward()
        for got, ref in zip(ins, ref_ins, strict=True):
            torch.testing.assert_close(got.grad[s:e], ref.grad)


def test_bad_shapes_have_clear_errors():
    q, k, v, cu, max_len = _packed([4], hq=3, hk=2)
    with pytest.raises(ValueError, match="not a multiple"):
        varlen_attention(q, k, v, cu, max_len)
    with pytest.raises(ValueError, match="packed"):
        varlen_attention(q[None], k, v, cu, max_len)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
def test_cuda_fast_path_matches_reference(window):
    from packtune.kernels.attention import varlen_attention_ref

    q, k, v, cu, max_len = _packed([100, 1, 300, 37], hq=8, hk=2, d=128, dtype=torch.bfloat16, device="cuda")
    out = varlen_attention(q, k, v, cu, max_len, window=window)
    exact = varlen_attention_ref(q.double(), k.double(), v.double(), cu, window=window)
    eager = varlen_attention_ref(q, k, v, cu, window=window)
    assert (out.double() - exact).abs().max() <= (eager.double() - exact).abs().max() + 1e-2


def test_bucketed_attention_keeps_one_copy_of_its_output():
    """What the CPU path saves for the backward: the bucketed q, k, v and SDPA's output and lse, plus
    int indices; not a second copy of the output (index_copy kept its source, [T, Hq, D], per layer)."""
    lengths = [7, 5, 5, 3]
    q, k, v, cu, longest = _packed(lengths, hq=4, hk=2, d=8, dtype=torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        varlen_attention(q, k, v, cu, longest)
    floats = sum(n for n, dtype in storages.values() if dtype.is_floating_point)
    padded = sum(lengths[b[0]] * len(b) for b in length_buckets(lengths))  # tokens of the padded buckets
    qkv_out = padded * (4 + 2 + 2 + 4) * 8 * 4
    lse = padded * 4 * 4
    assert floats <= qkv_out + lse, (floats, qkv_out + lse)
