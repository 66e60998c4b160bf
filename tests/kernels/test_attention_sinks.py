"""Attention sinks (gpt-oss): a learned logit per query head in every softmax's denominator. The
specification, written independently here: the attention without sinks times sigmoid(lse - sink),
lse the log-sum-exp of the row's masked logits; values and gradients in float64, on the packed
(buckets), per-sample reference, padded-row and KV-cache decoding paths."""

from __future__ import annotations

import math

import pytest
import torch

from packtune.kernels import varlen_attention
from packtune.kernels.attention import sdpa_attention, varlen_attention_ref


def _sunk(q, k, v, sinks, window=None, scale=None):
    """One sample [L, H, D] in float64: out_without_sinks * sigmoid(lse - sink), causal (and window)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    logits = torch.einsum("ihd,jhd->hij", q, k) * scale
    i, j = torch.arange(q.shape[0])[:, None], torch.arange(q.shape[0])[None]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [H, L]
    out = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v)
    return out * torch.sigmoid(lse - sinks[:, None]).T[..., None]


def _inputs(lengths, hq=4, hk=2, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, dtype=torch.float64, generator=gen).requires_grad_()
               for h in (hq, hk, hk))
    sinks = torch.randn(hq, dtype=torch.float64, generator=gen).requires_grad_()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, sinks, cu


@pytest.mark.parametrize("window", [None, 3])
def test_packed_sinks_equal_the_lse_formula_values_and_gradients(window):
    lengths = [5, 1, 9, 4]
    q, k, v, sinks, cu = _inputs(lengths)
    out = varlen_attention(q, k, v, cu, max(lengths), window=window, scale=0.3, sinks=sinks)
    bounds = cu.tolist()
    expected = torch.cat([_sunk(q[a:b], k[a:b], v[a:b], sinks, window, 0.3)
                          for a, b in zip(bounds, bounds[1:], strict=False)])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    ref = varlen_attention_ref(q, k, v, cu, window=window, scale=0.3, sinks=sinks)
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, sinks), grad)
    want = torch.autograd.grad(expected, (q, k, v, sinks), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_sinks_only_shrink_the_output_and_a_very_negative_sink_changes_nothing():
    q, k, v, sinks, cu = _inputs([6])
    plain = varlen_attention(q, k, v, cu, 6)
    none = varlen_attention(q, k, v, cu, 6, sinks=torch.full((4,), -1e4, dtype=torch.float64))
    torch.testing.assert_close(none, plain, rtol=0, atol=1e-12)
    sunk = varlen_attention(q, k, v, cu, 6, sinks=sinks)
    assert (sunk.norm(dim=-1) <= plain.norm(dim=-1) + 1e-12).all()


def test_decoding_step_with_sinks_equals_the_full_row():
    """A KV-cache step's query (the last position) over the cached keys, as sdpa_attention computes it
    with a padding mask, equals the last row of the whole sample's attention."""
    q, k, v, sinks, _ = _inputs([7])
    full = _sunk(q, k, v, sinks)
    keys = torch.cat([k, torch.zeros(2, 2, 16, dtype=torch.float64)])  # two unused cache slots
    values = torch.cat([v, torch.zeros(2, 2, 16, dtype=torch.float64)])
    mask = (torch.arange(9) < 7)[None, None, None, :]
    step = sdpa_attention(q[-1][None, :, None], keys.transpose(0, 1)[None],
                          values.transpose(0, 1)[None], attn_mask=mask, is_causal=False, scale=None,
                          enable_gqa=True, sinks=sinks)
    torch.testing.assert_close(step[0, :, 0], full[-1], rtol=1e-12, atol=1e-12)
