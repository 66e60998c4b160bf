"""ALiBi (BLOOM) in packed attention: slopes as transformers builds them, and varlen_attention
(length buckets and the KV-cache form) against a per-sample float64 computation written out with
transformers' bias slope * key_position."""

import math
from types import SimpleNamespace

import pytest
import torch

from packtune.kernels import PackedLayout, varlen_attention
from packtune.kernels.attention import alibi_head_slopes, varlen_attention_ref
from packtune.model.kv_cache import KVCache
from packtune.model.llama import dense_causal_attention


def _alibi_naive(q, k, v, slopes, scale):
    """One sample, float64: transformers' BLOOM scores slope * key_pos + scale * q.k, causal, softmax."""
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    j = torch.arange(q.shape[0], dtype=torch.float64)
    scores = scores + slopes.double()[:, None, None] * j
    causal = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 40])
def test_slopes_equal_transformers(heads):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    expected = bloom._get_alibi_slopes(heads, torch.device("cpu"))
    torch.testing.assert_close(alibi_head_slopes(heads), expected, rtol=0, atol=0)
    if heads & (heads - 1) == 0:  # the paper's geometric sequence for powers of two
        expected = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])
        torch.testing.assert_close(alibi_head_slopes(heads), expected)


@pytest.mark.parametrize("heads", [4, 6])
def test_packed_alibi_equals_each_sample_alone(heads):
    """Many samples of mixed lengths (several per bucket, an empty one), float64: values and q/k/v
    gradients equal the written-out per-sample computation, whose positions restart per sample."""
    gen = torch.Generator().manual_seed(0)
    lengths = [*torch.randint(1, 30, (12,), generator=gen).tolist(), 0, 9]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    t, d, scale = sum(lengths), 8, 8**-0.5
    q, k, v = (torch.randn(t, heads, d, dtype=torch.float64, generator=gen) for _ in range(3))
    slopes = alibi_head_slopes(heads)
    w = torch.randn(t, heads, d, dtype=torch.float64, generator=gen)

    def run(fn):
        ins = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*ins)
        (out * w).sum().backward()
        return out.detach(), [x.grad for x in ins]

    def naive(q, k, v):
        bounds = cu.tolist()
        return torch.cat([_alibi_naive(q[s:e], k[s:e], v[s:e], slopes, scale)
                          for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s])

    expected, expected_grads = run(naive)
    for fn in (lambda *x: varlen_attention(*x, cu, max(lengths), alibi_slopes=slopes),
               lambda *x: varlen_attention_ref(*x, cu, alibi_slopes=slopes)):
        out, grads = run(fn)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    plain = varlen_attention(q, k, v, cu, max(lengths))
    assert (plain - expected).abs().max() > 1e-3  # the biases matter at these slopes and lengths


def test_cached_queries_get_the_biases_of_their_positions():
    """KV-cache decoding (a packed prefill of two prompts, then one query per sequence at its own
    position) equals the same rows of each full sequence."""
    gen = torch.Generator().manual_seed(1)
    heads, d, lengths = 3, 8, (7, 4)
    seqs = [tuple(torch.randn(n + 1, heads, d, dtype=torch.float64, generator=gen) for _ in range(3))
            for n in lengths]
    slopes = alibi_head_slopes(heads)
    full = [dense_causal_attention(q[None], k[None], v[None], alibi_slopes=slopes)[0] for q, k, v in seqs]
    for (q, k, v), out in zip(seqs, full, strict=True):
        torch.testing.assert_close(out, _alibi_naive(q, k, v, slopes, d**-0.5), rtol=1e-12, atol=1e-12)

    args = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=heads, head_dim=d)
    cache = KVCache(args, len(lengths), max(lengths) + 1, device=torch.device("cpu"), dtype=torch.float64)
    layout = PackedLayout.packed(list(lengths))
    prompts = [torch.cat([s[i][:n] for s, n in zip(seqs, lengths, strict=True)]) for i in range(3)]
    cache.begin(torch.zeros(sum(lengths), dtype=torch.long), layout)
    prefill = cache.attend(0, *prompts, window=None, scale=None, softcap=None, alibi_slopes=slopes)
    cache.advance()
    torch.testing.assert_close(prefill, torch.cat([out[:n] for out, n in zip(full, lengths, strict=True)]),
                               rtol=1e-12, atol=1e-12)
    cache.begin(torch.zeros(len(lengths), dtype=torch.long), None)
    queries = (torch.stack([s[i][n] for s, n in zip(seqs, lengths, strict=True)]) for i in range(3))
    step = cache.attend(0, *queries, window=None, scale=None, softcap=None, alibi_slopes=slopes)
    torch.testing.assert_close(step, torch.stack([out[n] for out, n in zip(full, lengths, strict=True)]),
                               rtol=1e-12, atol=1e-12)
    assert math.isfinite(step.abs().max().item())
