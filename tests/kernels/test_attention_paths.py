"""The CUDA attention dispatch, checked on the CPU with stand-ins for torch's `varlen_attn`.

`varlen_attn` changed signature across torch releases: the older form takes `is_causal` and has
no `scale`, `window_size` or `enable_gqa`; PyTorch >= 2.12 has the keyword-only `scale`,
`window_size` and `enable_gqa`. Each fake below has one of those signatures, computes the
per-sample reference on the rows it was given, and leaves the rows past cu_seqlens[-1] as
garbage (NaN), as the real kernels leave them uninitialised.
"""

import pytest
import torch

from packtune.kernels import attention
from packtune.kernels.attention import varlen_attention, varlen_attention_ref

CALLS: list[dict] = []


def _reference(q, k, v, cu, window_size, scale):
    left, right = window_size
    causal = right == 0
    window = None if left < 0 else left + 1
    out = varlen_attention_ref(q, k, v, cu, causal=causal, window=window, scale=scale)
    out[int(cu[-1]):] = float("nan")  # the tail is never written
    return out


def varlen_attn_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The older signature: no scale, no window, no GQA."""
    assert query.shape[1] == key.shape[1], "this signature has no enable_gqa: kv heads must be expanded"
    CALLS.append({"is_causal": is_causal})
    return _reference(query, key, value, cu_seq_q, (-1, 0) if is_causal else (-1, -1), None)


def varlen_attn_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
    """The PyTorch >= 2.12 signature."""
    assert enable_gqa == (query.shape[1] != key.shape[1])
    CALLS.append({"window_size": tuple(window_size), "enable_gqa": enable_gqa, "scale": scale})
    return _reference(query, key, value, cu_seq_q, tuple(window_size), scale)


@pytest.fixture
def fake_varlen(monkeypatch, request):
    """torch varlen_attn replaced by a fake, no flash-attn, and CPU tensors routed like CUDA ones."""
    fn = request.param
    monkeypatch.setattr(attention, "_torch_varlen", lambda: fn)
    monkeypatch.setattr(attention, "_flash_attn", lambda: None)
    real_path = attention.attention_path
    monkeypatch.setattr(attention, "attention_path",
                        lambda device, dtype, **kw: real_path("cuda", torch.bfloat16, **kw))
    CALLS.clear()
    return fn


def _packed(lengths, hq, hk, extra=3, d=16):
    """q/k/v for samples of `lengths` plus `extra` padding rows past cu_seqlens[-1]."""
    t = sum(lengths) + extra
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(t, hq, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(t, hk, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize("fake_varlen", [varlen_attn_old, varlen_attn_new], indirect=True)
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attn_of_either_signature_matches_the_reference(fake_varlen, hq, hk, causal):
    q, k, v, cu, longest = _packed([5, 9, 1, 7], hq, hk)
    out = varlen_attention(q, k, v, cu, longest, causal=causal)
    assert len(CALLS) == 1, "the torch varlen_attn path was not taken"
    ref = varlen_attention_ref(q, k, v, cu, causal=causal)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[int(cu[-1]):], torch.zeros_like(out[int(cu[-1]):])), "tail rows must be zeros"
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    if fake_varlen is varlen_attn_new:
        assert CALLS[0]["enable_gqa"] == (hq != hk)
        assert CALLS[0]["window_size"] == ((-1, 0) if causal else (-1, -1))
    else:
        assert CALLS[0] == {"is_causal": causal}


@pytest.mark.parametrize("fake_varlen", [varlen_attn_new], indirect=True)
def test_new_signature_takes_windows_and_scale(fake_varlen):
    q, k, v, cu, longest = _packed([6, 11], 4, 2)
    out = varlen_attention(q, k, v, cu, longest, window=3, scale=0.2)
    assert CALLS == [{"window_size": (2, 0), "enable_gqa": True, "scale": 0.2}]
    torch.testing.assert_close(out, varlen_attention_ref(q, k, v, cu, window=3, scale=0.2))


@pytest.mark.parametrize("fake_varlen", [varlen_attn_old], indirect=True)
def test_old_signature_leaves_windows_and_scales_to_the_buckets(fake_varlen):
    q, k, v, cu, longest = _packed([6, 11], 4, 2)
    out = varlen_attention(q, k, v, cu, longest, window=3)
    out_scaled = varlen_attention(q, k, v, cu, longest, scale=0.2)
    assert CALLS == [], "the old signature cannot express a window or a scale"
    torch.testing.assert_close(out, varlen_attention_ref(q, k, v, cu, window=3))
    torch.testing.assert_close(out_scaled, varlen_attention_ref(q, k, v, cu, scale=0.2))


@pytest.mark.parametrize("fn,expected", [
    (varlen_attn_old, "torch varlen_attn (GQA by expanding kv heads; sliding windows: SDPA over length "
                      "buckets; custom scale: SDPA over length buckets); softcap / ALiBi: FlexAttention"),
    (varlen_attn_new, "torch varlen_attn (GQA native); softcap / ALiBi: FlexAttention"),
])
def test_env_line_names_the_path_this_torch_takes(monkeypatch, fn, expected):
    monkeypatch.setattr(attention, "_torch_varlen", lambda: fn)
    monkeypatch.setattr(attention, "_flash_attn", lambda: None)
    assert attention.attention_path("cuda", torch.bfloat16) == "torch_varlen"
    assert attention.attention_path("cuda", torch.float32) == "buckets"
    assert attention.describe_attention_paths() == f"CPU: SDPA over length buckets; CUDA bf16: {expected}"


def test_flash_attn_tail_rows_are_zeros(monkeypatch):
    """flash-attn leaves the rows past cu_seqlens[-1] unwritten too; every path returns zeros there."""
    class FakeFlash:
        @staticmethod
        def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, *, softmax_scale, causal, window_size):
            return _reference(q, k, v, cu_q, window_size, softmax_scale)

    monkeypatch.setattr(attention, "_flash_attn", lambda: FakeFlash)
    monkeypatch.setattr(attention, "attention_path", lambda device, dtype, **kw: "flash_attn")
    q, k, v, cu, longest = _packed([4, 8], 4, 2, extra=5)
    out = varlen_attention(q, k, v, cu, longest)
    torch.testing.assert_close(out, varlen_attention_ref(q, k, v, cu))
