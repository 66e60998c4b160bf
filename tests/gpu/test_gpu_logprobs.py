"""linear_logprobs compiled on the GPU at Llama-3-8B's lm_head (N=8192, H=4096, V=128256) and at
Gemma 2's softcapped vocabulary, against the float64 reference (values, dHidden, dW for per-segment
gradients of both signs); bitwise deterministic; no host sync given the batch's PackedLayout.
logprobs from Llama-3-8B-sized logits, in place and not, likewise. Skipped without CUDA."""

import numpy as np
import pytest
import torch
from gpu_checks import assert_matches, labels_for

from packtune.kernels import (
    PackedLayout,
    layout_segments,
    linear_logprobs,
    linear_logprobs_ref,
    logprobs,
    logprobs_ref,
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # slow: the full gpu-check pass only
LLAMA3_8B = (8192, 4096, 128256)


def _problem(n, h, v, segment_len=256, seed=0):
    torch.manual_seed(seed)
    h64 = torch.randn(n, h, device="cuda", dtype=torch.float64)
    w64 = torch.randn(v, h, device="cuda", dtype=torch.float64) / h**0.5 * 2
    labels = labels_for(n, v)
    lens = np.diff(np.append(np.arange(0, n, segment_len), n))
    layout = PackedLayout.packed(lens, labels.cpu()).to("cuda")
    ids, s = layout_segments(layout)
    upstream = torch.randn(s, device="cuda", dtype=torch.float64)  # both signs, as DPO's
    return h64, w64, labels, layout, ids, s, upstream


def _reference(h64, w64, labels, ids, s, upstream, softcap, block=1024):
    """The float64 reference (linear_logprobs_ref) on blocks of rows: the segment sum is linear, so
    summing the blocks' sums and dW is the whole reference, without 8 GiB float64 logits at once."""
    sums, dh = torch.zeros(s, device="cuda", dtype=torch.float64), torch.zeros_like(h64)
    w = w64.detach().requires_grad_()
    for start in range(0, h64.shape[0], block):
        rows = slice(start, start + block)
        h = h64[rows].detach().requires_grad_()
        out = linear_logprobs_ref(h, w, labels[rows], ids[rows], s, softcap=softcap)
        out.backward(upstream)
        sums += out.detach()
        dh[rows] = h.grad
    return sums, dh, w.grad


def _run(fn, h64, w64, dtype, upstream, *args, **kw):
    h, w = (t.to(dtype).detach().requires_grad_() for t in (h64, w64))
    out = fn(h, w, *args, **kw)
    out.backward(upstream.to(out.dtype))
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,softcap", [(LLAMA3_8B, None), ((2048, 2304, 256000), 30.0),
                                           ((37, 64, 1001), 5.0)])
def test_linear_logprobs(dtype, shape, softcap):
    n, h, v = shape
    h64, w64, labels, layout, ids, s, upstream = _problem(n, h, v, segment_len=min(256, n // 3))
    refs = _reference(h64, w64, labels, ids, s, upstream, softcap)
    got = _run(linear_logprobs, h64, w64, dtype, upstream, labels, ids, s, softcap=softcap, layout=layout)
    eager = _run(linear_logprobs_ref, h64, w64, dtype, upstream, labels, ids, s, softcap=softcap)
    label_rows = layout.num_label_rows
    for out, e, r, rtol, terms in zip(got, eager, refs, (1e-5, 1e-4, 1e-4), (h, v, label_rows), strict=True):
        assert_matches(out, e, r, rtol, dtype, sum_terms=terms)


def test_linear_logprobs_is_deterministic_and_sync_free():
    h64, w64, labels, layout, ids, s, upstream = _problem(*LLAMA3_8B)
    hidden, weight = h64.to(torch.bfloat16), w64.to(torch.bfloat16)
    del h64, w64
    args = (labels, ids, s)
    step = lambda: _run(linear_logprobs, hidden, weight, torch.bfloat16, upstream, *args, layout=layout)
    first = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _logits_reference(z64, labels, ids, s, upstream, block=1024):
    """logprobs_ref in float64 on blocks of rows: (per-segment sums, the logits' gradient)."""
    sums, dz = torch.zeros(s, device="cuda", dtype=torch.float64), torch.empty_like(z64)
    for start in range(0, z64.shape[0], block):
        rows = slice(start, start + block)
        z = z64[rows].detach().requires_grad_()
        out = logprobs_ref(z, labels[rows], ids[rows], s)
        out.backward(upstream)
        sums += out.detach()
        dz[rows] = z.grad
    return sums, dz


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_logprobs_from_logits(dtype, inplace):
    """Llama-3-8B's logits [8192, 128256] in bf16; fp32 on 1024 of those rows (time: the float64 pass)."""
    n, _, v = LLAMA3_8B
    n = n if dtype == torch.bfloat16 else 1024
    torch.manual_seed(0)
    z64 = torch.randn(n, v, device="cuda", dtype=torch.float64) * 3
    labels = labels_for(n, v)
    layout = PackedLayout.packed(np.diff(np.append(np.arange(0, n, 256), n)), labels.cpu()).to("cuda")
    ids, s = layout_segments(layout)
    upstream = torch.randn(s, device="cuda", dtype=torch.float64)
    refs = _logits_reference(z64, labels, ids, s, upstream)
    results = []
    for fn, kw in ((logprobs, {"inplace_backward": inplace}), (logprobs_ref, {})):
        z = z64.to(dtype).requires_grad_()
        out = fn(z, labels, ids, s, **kw)
        out.backward(upstream.to(out.dtype))
        results.append((out.detach(), z.grad))
        del z, out
    (got, eager) = results
    for out, e, r, rtol in zip(got, eager, refs, (1e-5, 1e-4), strict=True):
        assert_matches(out, e, r, rtol, dtype, sum_terms=n)
