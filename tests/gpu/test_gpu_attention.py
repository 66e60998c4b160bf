"""Each CUDA attention path against the per-sample reference, forward and backward: GQA, causal,
non-causal and sliding windows, ALiBi, rows past cu_seqlens[-1] zero. Skipped without CUDA.

"native" is the path `attention_path` picks on this machine (flash-attn, else torch's varlen_attn
in whichever signature this torch has, else the buckets); "buckets" forces the SDPA-over-length-
buckets path. Error bar against float64: the output no worse than per-sample SDPA's own bf16
error + 1e-2; gradients (another kernel's accumulation order, GQA's sum over query heads) within
twice SDPA's + 1e-2 + one bf16 step (2^-8) of the largest gradient entry.
"""

import pytest
import torch

from packtune.kernels import attention
from packtune.kernels.attention import varlen_attention, varlen_attention_ref

pytestmark = pytest.mark.gpu
LENGTHS = [100, 1, 300, 37, 511]


def _packed(hq, hk, d=128, tail=7):
    t = sum(LENGTHS) + tail
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(t, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q, k, v, cu


def _fwd_bwd(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("path", ["native", "buckets"])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 64), (False, None), (False, 33)])
@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2)])
def test_path_matches_per_sample_reference(monkeypatch, path, causal, window, hq, hk):
    if path == "buckets":
        monkeypatch.setattr(attention, "attention_path", lambda *args, **kwargs: "buckets")
    _check_against_reference(*_packed(hq, hk), dict(causal=causal, window=window))


@pytest.mark.parametrize("path", ["native", "buckets"])
@pytest.mark.parametrize("heads", [8, 12])
def test_alibi_matches_per_sample_reference(monkeypatch, path, heads):
    """BLOOM's ALiBi: flash-attn's alibi_slopes (native, when installed) or SDPA's float mask."""
    if path == "buckets":
        monkeypatch.setattr(attention, "attention_path", lambda *args, **kwargs: "buckets")
    slopes = attention.alibi_head_slopes(heads, "cuda")
    _check_against_reference(*_packed(heads, heads), dict(alibi_slopes=slopes))


def _check_against_reference(q, k, v, cu, kw):
    dout = torch.randn_like(q, dtype=torch.float64)
    got = _fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max(LENGTHS), **kw), q, k, v, dout)
    reference = lambda a, b, c: varlen_attention_ref(a, b, c, cu, **kw)
    exact = _fwd_bwd(reference, q.double(), k.double(), v.double(), dout)
    eager = _fwd_bwd(reference, q, k, v, dout)
    for name, out, ref, sdpa in zip(("out", "dq", "dk", "dv"), got, exact, eager, strict=True):
        assert torch.isfinite(out).all(), name
        err, sdpa_err = ((t.double() - ref).abs().max().item() for t in (out, sdpa))
        bar = sdpa_err + 1e-2 if name == "out" else 2 * sdpa_err + 1e-2 + 2**-8 * ref.abs().max().item()
        assert err <= bar, f"{name}: {err:.3g} vs SDPA's {sdpa_err:.3g}"
    tail = got[0][int(cu[-1]):]
    assert torch.equal(tail, torch.zeros_like(tail)), "rows past cu_seqlens[-1] must be zeros"


def test_native_path_is_the_one_env_reports_and_has_no_host_sync():
    varlen = attention._torch_varlen()
    expected = "flash_attn" if attention._flash_attn() else "torch_varlen" if varlen else "buckets"
    assert attention.attention_path("cuda", torch.bfloat16) == expected
    print(f"attention path on this machine: {attention.describe_attention_paths()}")
    if expected == "buckets":
        pytest.skip("no fast path on this machine (the buckets path reads cu_seqlens on the host)")
    q, k, v, cu = _packed(8, 2)
    varlen_attention(q, k, v, cu, max(LENGTHS))  # warm-up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        varlen_attention(q, k, v, cu, max(LENGTHS))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("path", ["native", "flex"])
@pytest.mark.parametrize(("hq", "hk", "kw"), [(8, 2, {"softcap": 20.0}),
                                              (8, 2, {"softcap": 20.0, "window": 64}),
                                              (8, 8, {"alibi": True}), (12, 12, {"alibi": True})])
def test_softcap_and_alibi_without_flash_attn(monkeypatch, path, hq, hk, kw):
    """Gemma 2's logit cap (with its sliding window) and BLOOM's ALiBi: on the path this machine
    takes (flash-attn, else FlexAttention) and forced through FlexAttention, forward and backward."""
    if path == "flex":
        monkeypatch.setattr(attention, "_flash_attn", lambda: None)
    assert attention.attention_path("cuda", torch.bfloat16, logit_mods=True) in ("flash_attn", "flex")
    options = {"softcap": kw.get("softcap"), "window": kw.get("window"),
               "alibi_slopes": attention.alibi_head_slopes(hq, "cuda") if kw.get("alibi") else None}
    _check_against_reference(*_packed(hq, hk), options)


def test_flex_path_has_no_host_sync(monkeypatch):
    monkeypatch.setattr(attention, "_flash_attn", lambda: None)
    q, k, v, cu = (t.requires_grad_() if t.is_floating_point() else t for t in _packed(8, 2))

    def step():
        out = varlen_attention(q, k, v, cu, max(LENGTHS), softcap=20.0)
        out.float().square().sum().backward()

    step()  # warm-up: torch.compile builds FlexAttention's kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("path", ["native", "flex"])
def test_gradients_past_the_last_sample_are_zero_in_nan_filled_memory(monkeypatch, path):
    """The caching allocator is first filled with NaN blocks of the gradients' size, so a kernel
    that leaves the rows past cu_seqlens[-1] of dq, dk, dv unwritten would hand NaN back."""
    if path == "flex":
        monkeypatch.setattr(attention, "_flash_attn", lambda: None)
    q, k, v, cu = _packed(8, 2, tail=300)
    options = {"softcap": 20.0} if path == "flex" else {}
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*leaves, cu, max(LENGTHS), **options)
    poisoned = [torch.full_like(t, float("nan")) for t in (q, k, v, q, k, v) for _ in range(2)]
    del poisoned  # freed into the cache: the backward's allocations of these sizes reuse them
    out.backward(torch.randn_like(out))
    end = int(cu[-1])
    for t in leaves:
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[end:], torch.zeros_like(t.grad[end:]))
