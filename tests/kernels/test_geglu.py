"""GeGLU (gelu_tanh(gate) * up): every fused backend against the float64 reference."""

import pytest
import torch
from kernel_checks import FUSED, assert_fp32_close, assert_low_precision_close, device_for

from packtune.kernels import geglu, geglu_ref


def _fwd_bwd(fn, gate, up, dy):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    y = fn(gate, up)
    y.backward(dy)
    return y.detach(), gate.grad, up.grad


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (2, 5, 2500), (4, 11008)])
def test_fp32_matches_float64_reference(backend, shape):
    dev = device_for(backend)
    g, u, dy = (torch.randn(shape, device=dev) * 4 for _ in range(3))
    got = _fwd_bwd(lambda a, b: geglu(a, b, backend=backend), g, u, dy)
    exact = _fwd_bwd(geglu_ref, g.double(), u.double(), dy.double())
    assert_fp32_close(got[0], exact[0], 1e-5)
    assert_fp32_close(got[1], exact[1], 1e-4)
    assert_fp32_close(got[2], exact[2], 1e-4)


@pytest.mark.parametrize("backend", FUSED)
def test_extreme_gate_values(backend):
    dev = device_for(backend)
    g = torch.tensor([[-200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0]], device=dev)
    u, dy = torch.ones_like(g), torch.ones_like(g)
    got = _fwd_bwd(lambda a, b: geglu(a, b, backend=backend), g, u, dy)
    exact = _fwd_bwd(geglu_ref, g.double(), u.double(), dy.double())
    for out, ref in zip(got, exact, strict=True):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch(backend, dtype):
    dev = device_for(backend)
    g, u, dy = (torch.randn(6, 2100, device=dev).to(dtype) for _ in range(3))
    got = _fwd_bwd(lambda a, b: geglu(a, b, backend=backend), g, u, dy)
    eager = _fwd_bwd(geglu_ref, g, u, dy)
    exact = _fwd_bwd(geglu_ref, g.double(), u.double(), dy.double())
    for out, torch_out, ref in zip(got, eager, exact, strict=True):
        assert out.dtype == dtype
        assert_low_precision_close(out, torch_out, ref, backend)


@pytest.mark.parametrize("backend", FUSED)
def test_halves_of_a_fused_projection(backend):
    """gate and up as row-strided views of one [N, 2C] tensor, as a fused gate_up projection gives."""
    dev = device_for(backend)
    fused = torch.randn(9, 2 * 700, device=dev, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    geglu(gate, up, backend=backend).sum().backward()
    fused64 = fused.detach().double().requires_grad_()
    geglu_ref(*fused64.chunk(2, dim=-1)).sum().backward()
    assert_fp32_close(fused.grad, fused64.grad, 1e-4)


def test_reference_and_shape_error():
    g, u = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(geglu(g, u, backend="torch"), geglu_ref(g, u))
    with pytest.raises(ValueError, match="must match in shape"):
        geglu(torch.randn(3, 4), torch.randn(3, 5))
