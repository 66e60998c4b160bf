"""The FlexAttention path (softcap and ALiBi on CUDA without flash-attn) run for real on the CPU, where
torch runs FlexAttention eagerly (forward only): its block mask against the element-level mask,
its outputs against the per-sample reference; and the varlen paths' gradients past cu_seqlens[-1]
zeroed even when the kernel leaves NaN there."""

import pytest
import torch

from packtune.kernels import attention
from packtune.kernels.attention import sample_mask, varlen_attention, varlen_attention_ref
from packtune.kernels.flex_attention import BLOCK, document_block_mask, flex_varlen_attention

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
LENGTHS = [100, 1, 300, 37, 150]


def _packed(hq, hk, d=16, tail=20, dtype=torch.float32):
    t = sum(LENGTHS) + tail
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(t, hq, d, dtype=dtype)
    k, v = (torch.randn(t, hk, d, dtype=dtype) for _ in range(2))
    return q, k, v, cu


def _dense_mask(cu, total, causal, window):
    """[T, T] bool, element by element from the reference's per-sample mask."""
    allowed = torch.zeros(total, total, dtype=torch.bool)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        within = sample_mask(end - start, causal, window, torch.device("cpu"))
        allowed[start:end, start:end] = True if within is None else within
    return allowed


@pytest.mark.parametrize(("causal", "window"), [(True, None), (True, 64), (False, None), (False, 100)])
def test_block_mask_marks_exactly_the_blocks_with_allowed_pairs(causal, window):
    """Partial blocks (some pairs allowed: mask_mod applied), full blocks (all allowed: skipped
    checks) and empty ones, T = 608 (not a multiple of 128), a tail past cu_seqlens[-1]."""
    _, _, _, cu = _packed(1, 1)
    total = int(cu[-1]) + 20
    dense = _dense_mask(cu, total, causal, window)
    nb = -(-total // BLOCK)
    padded = torch.zeros(nb * BLOCK, nb * BLOCK, dtype=torch.bool)
    padded[:total, :total] = dense
    blocks = padded.view(nb, BLOCK, nb, BLOCK).transpose(1, 2)
    inside = torch.zeros_like(padded)
    inside[:total, :total] = True
    inside = inside.view(nb, BLOCK, nb, BLOCK).transpose(1, 2)
    any_ok = blocks.any(-1).any(-1)
    all_ok = (blocks | ~inside).all(-1).all(-1) & any_ok
    mask = document_block_mask(cu, total, causal=causal, window=window)

    def flagged(count, index):
        dense_flags = torch.zeros(nb, nb, dtype=torch.bool)
        for row in range(nb):
            dense_flags[row, index[0, 0, row, : count[0, 0, row]].long()] = True
        return dense_flags

    assert torch.equal(flagged(mask.full_kv_num_blocks, mask.full_kv_indices), all_ok)
    assert torch.equal(flagged(mask.kv_num_blocks, mask.kv_indices), any_ok & ~all_ok)
    q_idx, kv_idx = torch.meshgrid(torch.arange(total), torch.arange(total), indexing="ij")
    assert torch.equal(mask.mask_mod(0, 0, q_idx, kv_idx), dense)


@pytest.mark.parametrize(("hq", "hk", "kw"), [
    (4, 4, {"softcap": 5.0}),
    (4, 2, {"softcap": 5.0, "window": 50}),
    (6, 6, {"alibi": True}),
    (4, 2, {"alibi": True, "causal": False, "window": 70}),
    (4, 4, {"softcap": 3.0, "alibi": True, "scale": 0.3}),
])
def test_flex_path_matches_the_per_sample_reference(hq, hk, kw):
    """Softcap (Gemma 2, with and without its sliding window), ALiBi (BLOOM), GQA, a custom scale:
    FlexAttention's output equals the reference's, and rows past cu_seqlens[-1] are zero."""
    q, k, v, cu = _packed(hq, hk)
    q = q * 3  # logits large enough for the cap to bite
    options = {"causal": kw.get("causal", True), "window": kw.get("window"), "scale": kw.get("scale"),
               "softcap": kw.get("softcap"),
               "alibi_slopes": attention.alibi_head_slopes(hq) if kw.get("alibi") else None}
    got = flex_varlen_attention(q, k, v, cu, **options)
    expected = varlen_attention_ref(q.double(), k.double(), v.double(), cu, **options)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[int(cu[-1]):], torch.zeros_like(got[int(cu[-1]):]))


def test_flex_is_the_cuda_path_for_softcap_and_alibi_without_flash_attn(monkeypatch):
    monkeypatch.setattr(attention, "_flash_attn", lambda: None)
    assert attention.attention_path("cuda", torch.bfloat16, logit_mods=True) == "flex"
    assert attention.attention_path("cpu", torch.float32, logit_mods=True) == "buckets"
    assert "softcap / ALiBi: FlexAttention" in attention.describe_attention_paths()
    called = []
    monkeypatch.setattr(attention, "attention_path", lambda *a, **kw: "flex")
    monkeypatch.setattr(attention, "flex_varlen_attention",
                        lambda *a, **kw: called.append(kw) or torch.full_like(a[0], float("nan")))
    q, k, v, cu = _packed(4, 4)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), softcap=2.0)
    assert called[0]["softcap"] == 2.0 and torch.equal(out[int(cu[-1]):], torch.zeros_like(out[int(cu[-1]):]))


class _KernelLeavingTails(torch.autograd.Function):
    """A varlen kernel as flash-attn / torch's varlen_attn behave past cu_seqlens[-1]: those rows of
    the output and of dq, dk, dv are never written (here: NaN, as reused memory can hold)."""

    @staticmethod
    def forward(ctx, q, k, v, cu):
        ctx.save_for_backward(q, k, v, cu)
        end = int(cu[-1])
        out = torch.full_like(q, float("nan"))
        out[:end] = varlen_attention_ref(q[:end], k[:end], v[:end], cu)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cu = ctx.saved_tensors
        end = int(cu[-1])
        with torch.enable_grad():
            leaves = [t[:end].detach().requires_grad_() for t in (q, k, v)]
            varlen_attention_ref(*leaves, cu).backward(dout[:end])
        grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        for g, leaf in zip(grads, leaves, strict=True):
            g[:end] = leaf.grad
        return *grads, None


def test_varlen_gradients_past_the_last_sample_are_zero_with_nan_filled_memory(monkeypatch):
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=True):
        return _KernelLeavingTails.apply(query, key, value, cu_seq_q)

    monkeypatch.setattr(attention, "_torch_varlen", lambda: varlen_attn)
    monkeypatch.setattr(attention, "attention_path", lambda *a, **kw: "torch_varlen")
    q, k, v, cu = _packed(4, 4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    varlen_attention(*leaves, cu, max(LENGTHS)).backward(dout)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    varlen_attention_ref(*exact, cu).backward(dout.double())
    end = int(cu[-1])
    for got, want in zip(leaves, exact, strict=True):
        assert torch.equal(got.grad[end:], torch.zeros_like(got.grad[end:]))
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)
