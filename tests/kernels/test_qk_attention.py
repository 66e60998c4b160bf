"""Varlen attention with separate query and key offsets (kernels/qk_attention.py): the bucketed CPU
path against a float64 attention written out here (values and gradients), and prefix sharing
(gathered keys) against the same samples packed apart."""

import math

import pytest
import torch

from packtune.kernels import varlen_attention
from packtune.kernels.packed_layout import GatheredKeys
from packtune.kernels.qk_attention import (
    gathered_key_attention,
    qk_buckets,
    varlen_qk_attention,
    varlen_qk_attention_ref,
)


def _naive(q, k, v, causal, window=None, scale=None, softcap=None):
    """One segment in float64: its queries the last of its keys (bottom-right), every step written out."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    lq, lk = q.shape[0], k.shape[0]
    i, j = torch.arange(lk - lq, lk)[:, None], torch.arange(lk)[None]
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j).abs() < window
    return torch.einsum("hij,jhd->ihd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v.double())


def _segments(q_lens, k_lens, hq=4, hk=2, d=8, dtype=torch.float64):
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(sum(k_lens), hk, d, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v, cu(q_lens), cu(k_lens)


CASES = {
    "causal": dict(causal=True),
    "window": dict(causal=True, window=3),
    "softcap": dict(causal=True, softcap=5.0, scale=0.3),
    "cross": dict(causal=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bucketed_path_matches_the_written_out_attention(case):
    torch.manual_seed(0)
    options = CASES[case]
    q_lens, k_lens = [3, 1, 7, 4, 5, 2], [5, 1, 7, 9, 5, 6]
    q, k, v, cu_q, cu_k = _segments(q_lens, k_lens)
    longest = max(q_lens), max(k_lens)
    out = varlen_qk_attention(q.float(), k.float(), v.float(), cu_q, cu_k, *longest, **options)
    expected = torch.cat([_naive(q[a:b], k[c:d], v[c:d], **options) for a, b, c, d in
                          zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True)])
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(varlen_qk_attention_ref(q, k, v, cu_q, cu_k, **options), expected)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(
        varlen_qk_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), **options), (q, k, v), upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_equal_query_and_key_segments_are_varlen_attention():
    torch.manual_seed(1)
    lens = [4, 9, 1, 6]
    q, k, v, cu, _ = _segments(lens, lens, hq=4, hk=4)
    torch.testing.assert_close(varlen_qk_attention(q, k, v, cu, cu, 9, 9), varlen_attention(q, k, v, cu, 9))


def test_rows_past_the_last_segment_are_zero_with_zero_gradients():
    torch.manual_seed(2)
    q, k, v, cu_q, cu_k = _segments([3, 2], [4, 2])
    q_long = torch.cat([q, torch.randn(2, *q.shape[1:], dtype=q.dtype)]).detach().requires_grad_()
    out = varlen_qk_attention(q_long, k, v, cu_q, cu_k, 3, 4)
    assert out[5:].abs().max() == 0
    (out * torch.randn_like(out)).sum().backward()
    assert q_long.grad[5:].abs().max() == 0


def test_a_causal_segment_with_fewer_keys_than_queries_is_refused():
    q, k, v, cu_q, cu_k = _segments([3], [2])
    with pytest.raises(ValueError, match="query segment 0 has 2 keys for 3 queries"):
        varlen_qk_attention(q, k, v, cu_q, cu_k, 3, 2)


def test_buckets_cover_every_segment_and_bound_the_padding():
    q_lens, k_lens = [3, 0, 7, 4, 5, 2, 9], [5, 2, 7, 9, 5, 6, 30]
    buckets = qk_buckets(q_lens, k_lens, waste=1.25)
    assert sorted(i for b in buckets for i in b) == [i for i, n in enumerate(q_lens) if n]
    for b in buckets:
        padded = len(b) * max(q_lens[i] for i in b) * max(k_lens[i] for i in b)
        assert len(b) == 1 or padded <= 1.25 * sum(q_lens[i] * k_lens[i] for i in b)


@pytest.mark.parametrize("window", [None, 4])
def test_shared_prefix_equals_the_samples_packed_apart(window):
    """Two samples [p, a] and [p, b] packed apart, against [p, a, b] with b's segment attending to
    p's keys and its own: the same outputs, and p's gradients the sum of its two copies'."""
    torch.manual_seed(3)
    hq, hk, d = 4, 2, 8
    p, a, b = (torch.randn(n, 3, hq + 2 * hk, d, dtype=torch.float64) for n in (5, 3, 4))

    def split(rows):
        return rows[:, 0, :hq], rows[:, 1, :hk], rows[:, 2, :hk]

    apart = torch.cat([p, a, p, b]).requires_grad_()
    q, k, v = split(apart)
    cu = torch.tensor([0, 8, 17], dtype=torch.int32)
    out_apart = varlen_attention(q, k, v, cu, 9, window=window)

    shared = torch.cat([p, a, b]).requires_grad_()
    q, k, v = split(shared)
    keys = GatheredKeys(torch.cat([torch.arange(8), torch.arange(5), torch.arange(8, 12)]),
                        torch.tensor([0, 8, 17], dtype=torch.int32), 9)
    cu = torch.tensor([0, 8, 12], dtype=torch.int32)
    out_shared = gathered_key_attention(q, k, v, cu, 9, keys, window=window)
    torch.testing.assert_close(out_shared, torch.cat([out_apart[:8], out_apart[13:]]))

    upstream = torch.randn_like(out_shared)
    upstream_apart = torch.cat([upstream[:8], torch.zeros_like(upstream[:5]), upstream[8:]])
    (grad_apart,) = torch.autograd.grad(out_apart, apart, upstream_apart)
    (grad_shared,) = torch.autograd.grad(out_shared, shared, upstream)
    expected = torch.cat([grad_apart[:5] + grad_apart[8:13], grad_apart[5:8], grad_apart[13:]])
    torch.testing.assert_close(grad_shared, expected)


def test_torch_varlen_path_passes_each_side_its_own_offsets(monkeypatch):
    """The CUDA path through torch's `varlen_attn` (a stand-in with its >= 2.12 signature, on the CPU):
    queries and keys keep their own offsets and longest segments, kv heads go through enable_gqa."""
    from packtune.kernels import qk_attention

    calls = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k, tuple(window_size), enable_gqa))
        return varlen_qk_attention_ref(q, k, v, cu_q, cu_k, causal=window_size[1] == 0, scale=scale)

    monkeypatch.setattr(qk_attention, "_torch_varlen", lambda: varlen_attn)
    monkeypatch.setattr(qk_attention, "attention_path", lambda *args, **kw: "torch_varlen")
    q_lens, k_lens = [3, 1, 7], [5, 1, 9]
    q, k, v, cu_q, cu_k = _segments(q_lens, k_lens)
    k, v = k[:, :1].contiguous(), v[:, :1].contiguous()
    out = varlen_qk_attention(q, k, v, cu_q, cu_k, 7, 9, scale=0.3)
    assert calls == [(cu_q.tolist(), cu_k.tolist(), 7, 9, (-1, 0), q.shape[1] != k.shape[1])]
    torch.testing.assert_close(out, varlen_qk_attention_ref(q, k, v, cu_q, cu_k, scale=0.3))
