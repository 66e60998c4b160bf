"""Every Triton kernel compiled on the GPU against the float64 reference: fp32 / bf16 / fp16, odd
shapes, and shapes past 2^31 elements (int64 offsets). Skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F
from gpu_checks import DTYPES, assert_matches, labels_for

from packtune.kernels import (
    bloom_gelu,
    bloom_gelu_ref,
    glu,
    glu_ref,
    linear_cross_entropy,
    masked_cross_entropy,
    rms_norm,
    rms_norm_ref,
    rope_cos_sin,
    rotary,
    rotary_ref,
    swiglu,
    swiglu_ref,
)
from packtune.kernels.cross_entropy import masked_cross_entropy_ref
from packtune.kernels.rotary import positions_from_cu_seqlens

pytestmark = pytest.mark.gpu


def _grad_of(fn, *inputs, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", [(1, 7), (37, 1000), (513, 32001), (64, 128256)])
@pytest.mark.parametrize("inplace", [False, True])
def test_masked_cross_entropy(dtype, n, v, inplace):
    x64 = torch.randn(n, v, device="cuda", dtype=torch.float64) * 3
    labels = labels_for(n, v)
    ref, (g_ref,) = _grad_of(lambda x: masked_cross_entropy_ref(x, labels), x64)
    eager, (g_eager,) = _grad_of(lambda x: F.cross_entropy(x, labels), x64.to(dtype))
    fused = lambda x: masked_cross_entropy(x * 1, labels, inplace_backward=inplace)  # x * 1: keep the leaf
    out, (g,) = _grad_of(fused, x64.to(dtype))
    assert_matches(out, eager, ref, 1e-5, dtype)
    assert_matches(g, g_eager, g_ref, 1e-4, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,v", [(3, 64, 1000), (1000, 256, 32001), (4100, 512, 16384)])
def test_linear_cross_entropy(dtype, n, h, v):
    h64 = torch.randn(n, h, device="cuda", dtype=torch.float64)
    w64 = torch.randn(v, h, device="cuda", dtype=torch.float64) / h**0.5
    labels = labels_for(n, v)
    ref, g_ref = _grad_of(lambda a, b: masked_cross_entropy_ref(a @ b.t(), labels), h64, w64)
    eager, g_eager = _grad_of(lambda a, b: F.cross_entropy(a @ b.t(), labels), h64.to(dtype), w64.to(dtype))
    out, g = _grad_of(lambda a, b: linear_cross_entropy(a, b, labels), h64.to(dtype), w64.to(dtype))
    assert_matches(out, eager, ref, 1e-5, dtype)
    for got, e, r in zip(g, g_eager, g_ref, strict=True):
        assert_matches(got, e, r, 1e-4, dtype)


def test_linear_cross_entropy_is_deterministic():
    hidden = torch.randn(5000, 512, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(32000, 512, device="cuda", dtype=torch.bfloat16) / 512**0.5
    labels = labels_for(5000, 32000)
    runs = [_grad_of(lambda a, b: linear_cross_entropy(a, b, labels), hidden, weight) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 7), (333, 4096), (1000, 5000)])
def test_rms_norm(dtype, rows, cols):
    x64 = torch.randn(rows, cols, device="cuda", dtype=torch.float64)
    w64 = 1 + 0.1 * torch.randn(cols, device="cuda", dtype=torch.float64)
    dy = torch.randn(rows, cols, device="cuda", dtype=torch.float64)
    ref, g_ref = _grad_of(rms_norm_ref, x64, w64, grad_out=dy)
    eager, g_eager = _grad_of(rms_norm_ref, x64.to(dtype), w64.to(dtype), grad_out=dy.to(dtype))
    out, g = _grad_of(rms_norm, x64.to(dtype), w64.to(dtype), grad_out=dy.to(dtype))
    assert_matches(out, eager, ref, 1e-5, dtype)
    for got, e, r in zip(g, g_eager, g_ref, strict=True):
        assert_matches(got, e, r, 1e-4, dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 7), (257, 8192), (1000, 5001)])
def test_glu(activation, dtype, rows, cols):
    g64, u64, dy = (torch.randn(rows, cols, device="cuda", dtype=torch.float64) for _ in range(3))
    reference, fused = (lambda g, u: glu_ref(g, u, activation)), (lambda g, u: glu(g, u, activation))
    ref, g_ref = _grad_of(reference, g64, u64, grad_out=dy)
    eager, g_eager = _grad_of(reference, g64.to(dtype), u64.to(dtype), grad_out=dy.to(dtype))
    out, g = _grad_of(fused, g64.to(dtype), u64.to(dtype), grad_out=dy.to(dtype))
    assert_matches(out, eager, ref, 1e-5, dtype)
    for got, e, r in zip(g, g_eager, g_ref, strict=True):
        assert_matches(got, e, r, 1e-4, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (333, 4096), (3, 1000, 4097)])
def test_bloom_gelu(dtype, shape):
    """BLOOM's tanh GELU, forward and backward kernels, against float64."""
    x64, dy = (torch.randn(shape, device="cuda", dtype=torch.float64) * 3 for _ in range(2))
    ref, (g_ref,) = _grad_of(bloom_gelu_ref, x64, grad_out=dy)
    eager, (g_eager,) = _grad_of(bloom_gelu_ref, x64.to(dtype), grad_out=dy.to(dtype))
    out, (g,) = _grad_of(bloom_gelu, x64.to(dtype), grad_out=dy.to(dtype))
    assert_matches(out, eager, ref, 1e-5, dtype)
    assert_matches(g, g_eager, g_ref, 1e-4, dtype)


def _tables(head_dim, max_pos):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim)
    return rope_cos_sin(inv_freq, max_pos)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rotary(dtype, head_dim):
    lengths = [1, 17, 1, 300, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    t = sum(lengths)
    q64 = torch.randn(t, 8, head_dim, device="cuda", dtype=torch.float64)
    k64 = torch.randn(t, 2, head_dim, device="cuda", dtype=torch.float64)
    cos, sin = _tables(head_dim, 512)
    pos = positions_from_cu_seqlens(cu, t)
    q_ref = rotary_ref(q64, cos.double(), sin.double(), pos)
    q_eager = rotary_ref(q64.to(dtype), cos, sin, pos)
    q_out, k_out = rotary(q64.to(dtype), k64.to(dtype), cos, sin, cu_seqlens=cu)
    assert_matches(q_out, q_eager, q_ref, 1e-5, dtype)
    k_ref = rotary_ref(k64, cos.double(), sin.double(), pos)
    assert_matches(k_out, rotary_ref(k64.to(dtype), cos, sin, pos), k_ref, 1e-5, dtype)


# ---- past 2^31 elements: every offset must be int64 ----------------------------------------------


@pytest.mark.slow  # gpu-check --quick leaves the > 2^31-element shapes out
def test_cross_entropy_past_2_31_elements():
    n, v = 17000, 128256  # 2.18e9 logits, 4.4 GB in bf16
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    labels = labels_for(n, v)
    rows = torch.tensor([0, 1, n - 2, n - 1], device="cuda")
    picked = x[rows].double().requires_grad_()
    loss_rows = masked_cross_entropy_ref(picked, labels[rows], reduction="none")
    count = (labels != -100).sum()
    (g_rows,) = torch.autograd.grad(loss_rows.sum() / count, picked)
    expected = sum(F.cross_entropy(x[i:i + 2048].float(), labels[i:i + 2048], reduction="sum")
                   for i in range(0, n, 2048)) / count
    x.requires_grad_()
    loss = masked_cross_entropy(x, labels, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-4, atol=1e-4)
    assert (x.grad[rows].double() - g_rows).abs().max() <= 2**-7 * g_rows.abs().max() + 1e-6


@pytest.mark.slow  # gpu-check --quick leaves the > 2^31-element shapes out
def test_rms_norm_and_swiglu_past_2_31_elements():
    rows, cols = (1 << 31) // 4096 + 3, 4096
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(cols, device="cuda", dtype=torch.bfloat16)
    tail = slice(rows - 2, rows)
    out = rms_norm(x, w)[tail].float()
    torch.testing.assert_close(out, rms_norm_ref(x[tail], w).float(), rtol=2e-2, atol=2e-2)
    y = swiglu(x, x)
    torch.testing.assert_close(y[tail].float(), swiglu_ref(x[tail], x[tail]).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow  # gpu-check --quick leaves the > 2^31-element shapes out
def test_rotary_past_2_31_elements():
    t, heads, d = (1 << 31) // (32 * 128) + 3, 32, 128
    q = torch.randn(t, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, 8, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    cos, sin = _tables(d, t)
    q_out, _ = rotary(q, k, cos, sin, cu_seqlens=cu)
    pos = torch.arange(t - 2, t, device="cuda")
    expected = rotary_ref(q[-2:], cos, sin, pos).float()
    torch.testing.assert_close(q_out[-2:].float(), expected, rtol=2e-2, atol=2e-2)
