"""BLOOM's GELU: the reference is transformers' own GeLUFunction (forward and its hand-written
backward, Megatron's constants); the Triton kernel (through the interpreter here) against it in
float64."""

import pytest
import torch
from kernel_checks import assert_fp32_close, device_for

from packtune.kernels.bloom_gelu import bloom_gelu


def _fwd_bwd(fn, x, dy):
    x = x.detach().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad


def test_torch_backend_is_transformers_bloom_gelu_in_float64():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(3, 257, dtype=torch.float64, generator=gen) * 3 for _ in range(2))
    got = _fwd_bwd(lambda t: bloom_gelu(t, backend="torch"), x, dy)
    expected = _fwd_bwd(bloom.GeLUFunction.apply, x, dy)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # not torch's tanh GELU: its sqrt(2/pi) differs from Megatron's 0.79788456 in the 9th digit
    assert (got[0] - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() > 1e-11


@pytest.mark.parametrize("shape", [(1,), (3, 1000), (2, 5, 2500)])
def test_triton_fp32_matches_float64_reference(shape):
    dev = device_for("triton")
    x, dy = (torch.randn(shape, device=dev) * 4 for _ in range(2))
    got = _fwd_bwd(lambda t: bloom_gelu(t, backend="triton"), x, dy)
    exact = _fwd_bwd(lambda t: bloom_gelu(t, backend="torch"), x.double(), dy.double())
    assert_fp32_close(got[0], exact[0], 1e-5)
    assert_fp32_close(got[1], exact[1], 1e-4)


def test_triton_extreme_values_stay_finite():
    x = torch.tensor([-200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0], device=device_for("triton"))
    got = _fwd_bwd(lambda t: bloom_gelu(t, backend="triton"), x, torch.ones_like(x))
    exact = _fwd_bwd(lambda t: bloom_gelu(t, backend="torch"), x.double(), torch.ones_like(x).double())
    for out, ref in zip(got, exact, strict=True):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-30)
