"""T5's relative-position-biased varlen attention (kernels/relative_attention.py): the buckets equal
transformers', the per-segment reference equals the attention written out over the whole row, and the
CPU path (length buckets) equals the reference in float64, values and gradients (q, k, v and the
bucket table), with segments of length 1 and of very different lengths."""

import pytest
import torch

from packtune.kernels.relative_attention import (
    bias_block,
    relative_bias,
    t5_relative_buckets,
    varlen_relative_attention,
    varlen_relative_attention_ref,
)

LENGTHS = [1, 37, 3, 1, 64, 2, 9]
HEADS, DIM = 3, 8


def _row(lengths, tail=0, dtype=torch.float64, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    t = sum(lengths) + tail
    q, k, v = (torch.randn(t, HEADS, DIM, generator=gen, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    table = torch.randn(8, HEADS, generator=gen, dtype=dtype)
    return q, k, v, cu, table


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (6, 7)])
def test_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    relative = torch.arange(-300, 301)
    expected = modeling_t5.T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    got = t5_relative_buckets(relative, bidirectional=bidirectional, num_buckets=num_buckets,
                              max_distance=max_distance)
    assert torch.equal(got, expected)


def test_bias_block_equals_transformers_compute_bias():
    """transformers' compute_bias (a [1, H, Lq, Lk] bias; Lq < Lk: a cache step's last queries)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(num_heads=HEADS, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20, is_decoder=True)
    attention = transformers.models.t5.modeling_t5.T5Attention(config, has_relative_attention_bias=True,
                                                                 layer_idx=0)
    table = attention.relative_attention_bias.weight
    bias = relative_bias(table, 40, bidirectional=False, max_distance=20)
    for lq, lk in [(33, 33), (1, 30), (5, 12)]:
        expected = attention.compute_bias(lq, lk, past_seen_tokens=lk - lq)[0]
        assert torch.equal(bias_block(bias, lq, lk, table.dtype), expected)


def _dense(q, k, v, bias, cu, causal):
    """The attention written out over the whole row: a [H, T, T] bias and mask (tests only)."""
    t = q.shape[0]
    ids = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff().long())
    pos = torch.arange(t) - cu.long()[ids]
    center = (bias.shape[1] - 1) // 2
    rel = (pos[None, :] - pos[:, None]).clamp(-center, center) + center
    allowed = ids[:, None] == ids[None, :]
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    logits = torch.einsum("ihd,jhd->hij", q, k) + bias[:, rel]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", probs, v)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_equals_attention_written_out(causal):
    q, k, v, cu, table = _row(LENGTHS)
    bias = relative_bias(table, max(LENGTHS), bidirectional=not causal, max_distance=20)
    got = varlen_relative_attention_ref(q, k, v, bias, cu, causal=causal, scale=1.0)
    torch.testing.assert_close(got, _dense(q, k, v, bias, cu, causal), rtol=1e-12, atol=1e-12)


def _values_and_grads(fn, q, k, v, table, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [LENGTHS, [1], [5, 5, 5, 5], [1, 1, 1], [70, 1], [8, 7, 8, 6]])
def test_buckets_equal_reference_values_and_grads(causal, lengths):
    q, k, v, cu, table = _row(lengths, tail=3)
    longest = max(lengths)

    def run(fn):
        def call(q, k, v, table):
            bias = relative_bias(table, longest, bidirectional=not causal, max_distance=20)
            return fn(q, k, v, bias)
        return call

    fast = run(lambda q, k, v, b: varlen_relative_attention(q, k, v, b, cu, longest, causal=causal, scale=1))
    ref = run(lambda q, k, v, b: varlen_relative_attention_ref(q, k, v, b, cu, causal=causal, scale=1))
    dout = torch.randn_like(q)
    got, expected = (_values_and_grads(fn, q, k, v, table, dout) for fn in (fast, ref))
    assert got[0][cu[-1]:].eq(0).all()  # rows past cu_seqlens[-1] are zero
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_default_scale_is_head_dim_inverse_sqrt():
    q, k, v, cu, table = _row([4, 6])
    bias = relative_bias(table, 6, bidirectional=True, max_distance=20)
    got = varlen_relative_attention(q, k, v, bias, cu, 6, causal=False)
    expected = varlen_relative_attention(q * DIM**-0.5, k, v, bias, cu, 6, causal=False, scale=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_bad_shapes_raise_one_clear_error():
    q, k, v, cu, table = _row([4, 6])
    bias = relative_bias(table, 6, bidirectional=True, max_distance=20)
    with pytest.raises(ValueError, match="bias covers relative positions up to 5, max_seqlen 7"):
        varlen_relative_attention(q, k, v, bias, cu, 7, causal=False)
    with pytest.raises(ValueError, match=r"must be \[H, 2 \* max_seqlen - 1\]"):
        varlen_relative_attention(q, k, v, bias[:2], cu, 6, causal=False)
    short = relative_bias(table, 4, bidirectional=True, max_distance=20)
    with pytest.raises(ValueError, match="a segment of 6 tokens is longer than max_seqlen 4"):
        varlen_relative_attention(q, k, v, short, cu, 4, causal=False)
