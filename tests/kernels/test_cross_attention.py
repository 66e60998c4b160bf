"""Varlen cross-attention (kernels/cross_attention.py, varlen_qk_attention without causality): the
per-pair reference equals the attention written out over both rows, and the CPU path (segment buckets,
masked only where a bucket's key segments differ in length) equals the reference in float64, values
and gradients, with query and key segments of length 1 and of very different lengths."""

import pytest
import torch

from packtune.kernels.cross_attention import varlen_cross_attention, varlen_cross_attention_ref

Q_LENGTHS = [1, 20, 3, 1, 40, 2]
K_LENGTHS = [30, 1, 3, 64, 2, 7]
HEADS, DIM = 3, 8


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _rows(q_lengths, k_lengths, tail=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lengths) + tail, HEADS, DIM, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(sum(k_lengths), HEADS, DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, _cu(q_lengths), _cu(k_lengths)


def test_reference_equals_attention_written_out():
    q, k, v, cu_q, cu_k = _rows(Q_LENGTHS, K_LENGTHS)
    q_ids = torch.repeat_interleave(torch.arange(len(Q_LENGTHS)), torch.tensor(Q_LENGTHS))
    k_ids = torch.repeat_interleave(torch.arange(len(K_LENGTHS)), torch.tensor(K_LENGTHS))
    logits = torch.einsum("ihd,jhd->hij", q, k) * 0.7
    probs = logits.masked_fill(q_ids[:, None] != k_ids[None, :], float("-inf")).softmax(-1)
    expected = torch.einsum("hij,jhd->ihd", probs, v)
    got = varlen_cross_attention_ref(q, k, v, cu_q, cu_k, scale=0.7)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q_lengths,k_lengths", [
    (Q_LENGTHS, K_LENGTHS), ([1], [1]), ([4, 4, 4], [9, 9, 9]), ([1, 1, 1], [50, 2, 1]), ([60, 1], [1, 60]),
    ([3, 3, 2, 3], [10, 9, 10, 8]),  # one bucket of four pairs: padded queries and masked keys
])
def test_buckets_equal_reference_values_and_grads(q_lengths, k_lengths):
    q, k, v, cu_q, cu_k = _rows(q_lengths, k_lengths, tail=2)
    dout = torch.randn_like(q)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout)
        return [out.detach(), *(t.grad for t in leaves)]

    got = run(lambda q, k, v: varlen_cross_attention(q, k, v, cu_q, cu_k, max(q_lengths), max(k_lengths),
                                                     scale=1.0))
    expected = run(lambda q, k, v: varlen_cross_attention_ref(q, k, v, cu_q, cu_k, scale=1.0))
    assert got[0][cu_q[-1]:].eq(0).all()  # rows past cu_seqlens_q[-1] are zero
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_mismatched_segments_raise_one_clear_error():
    q, k, v, cu_q, _ = _rows([2, 3], [4, 5])
    with pytest.raises(ValueError, match="2 query segments but 1 key segments"):
        varlen_cross_attention(q, k, v, cu_q, _cu([9]), 3, 9)
    with pytest.raises(ValueError, match="query segment 1 has 0 keys for 3 queries"):
        varlen_cross_attention(q, k, v, cu_q, _cu([9, 0]), 3, 9)


@pytest.mark.parametrize("signature", ["old", "new"])
def test_torch_varlen_path_passes_each_side_its_own_offsets(monkeypatch, signature):
    """The CUDA path through torch's `varlen_attn` (stand-ins with its older and >= 2.12 signatures, on
    the CPU): queries and keys keep their own offsets and longest segments, no causal mask."""
    from packtune.kernels import qk_attention

    calls = []

    def varlen_attn_new(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k, tuple(window_size), scale))
        return varlen_cross_attention_ref(q, k, v, cu_q, cu_k, scale=scale)

    def varlen_attn_old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k, is_causal))
        return varlen_cross_attention_ref(q, k, v, cu_q, cu_k)

    fn = varlen_attn_new if signature == "new" else varlen_attn_old
    monkeypatch.setattr(qk_attention, "_torch_varlen", lambda: fn)
    monkeypatch.setattr(qk_attention, "attention_path", lambda *args, **kw: "torch_varlen")
    q, k, v, cu_q, cu_k = _rows(Q_LENGTHS, K_LENGTHS)
    scale = 0.7 if signature == "new" else None
    out = varlen_cross_attention(q, k, v, cu_q, cu_k, max(Q_LENGTHS), max(K_LENGTHS), scale=scale)
    options = ((-1, -1), 0.7) if signature == "new" else (False,)
    assert calls == [(cu_q.tolist(), cu_k.tolist(), max(Q_LENGTHS), max(K_LENGTHS), *options)]
    torch.testing.assert_close(out, varlen_cross_attention_ref(q, k, v, cu_q, cu_k, scale=scale))
