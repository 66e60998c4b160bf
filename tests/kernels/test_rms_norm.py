import pytest
import torch
from kernel_checks import FUSED, assert_fp32_close, assert_low_precision_close, device_for

from packtune.kernels import RMSNorm, rms_norm, rms_norm_ref


def _fwd_bwd(fn, x, w, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(1, 64), (37, 80), (3, 5, 1000), (2, 4096)])
def test_fp32_matches_float64_reference(backend, shape):
    dev = device_for(backend)
    x = torch.randn(shape, device=dev) * 3
    w = torch.randn(shape[-1], device=dev)
    dy = torch.randn(shape, device=dev)
    y, dx, dw = _fwd_bwd(lambda a, b: rms_norm(a, b, 1e-5, backend=backend), x, w, dy)
    y64, dx64, dw64 = _fwd_bwd(lambda a, b: rms_norm_ref(a, b, 1e-5), x.double(), w.double(), dy.double())
    assert_fp32_close(y, y64, 1e-5)
    assert_fp32_close(dx, dx64, 1e-4)
    assert_fp32_close(dw, dw64, 1e-4)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch(backend, dtype):
    dev = device_for(backend)
    x = torch.randn(19, 300, device=dev).to(dtype)
    w = (1 + 0.1 * torch.randn(300, device=dev)).to(dtype)
    dy = torch.randn(19, 300, device=dev).to(dtype)
    got = _fwd_bwd(lambda a, b: rms_norm(a, b, backend=backend), x, w, dy)
    eager = _fwd_bwd(lambda a, b: rms_norm_ref(a, b), x, w, dy)
    exact = _fwd_bwd(lambda a, b: rms_norm_ref(a, b), x.double(), w.double(), dy.double())
    for out, torch_out, ref in zip(got, eager, exact, strict=True):
        assert out.dtype == dtype
        assert_low_precision_close(out, torch_out, ref, backend)


@pytest.mark.parametrize("backend", FUSED)
def test_fp32_weight_with_bf16_activations(backend):
    dev = device_for(backend)
    x = torch.randn(7, 96, device=dev).bfloat16()
    w = torch.randn(96, device=dev)
    dy = torch.randn(7, 96, device=dev).bfloat16()
    y, dx, dw = _fwd_bwd(lambda a, b: rms_norm(a, b, backend=backend), x, w, dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    exact = _fwd_bwd(lambda a, b: rms_norm_ref(a, b), x.double(), w.double(), dy.double())
    eager = _fwd_bwd(lambda a, b: rms_norm_ref(a, b), x, w, dy)
    for out, torch_out, ref in zip((y, dx, dw), eager, exact, strict=True):
        assert_low_precision_close(out, torch_out, ref, backend)


@pytest.mark.parametrize("backend", FUSED)
def test_weight_gradient_is_deterministic(backend):
    dev = device_for(backend)
    x, dy = torch.randn(67, 130, device=dev), torch.randn(67, 130, device=dev)
    w = torch.randn(130, device=dev)
    first = _fwd_bwd(lambda a, b: rms_norm(a, b, backend=backend), x, w, dy)[2]
    second = _fwd_bwd(lambda a, b: rms_norm(a, b, backend=backend), x, w, dy)[2]
    assert torch.equal(first, second)


def test_module_matches_transformers_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-6)
    ours = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        hf.weight.normal_()
        ours.weight.copy_(hf.weight)
    x = torch.randn(2, 9, 48)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-6)


def test_weight_shape_error_is_specific():
    with pytest.raises(ValueError, match=r"weight has shape \(5,\), expected \(8,\)"):
        rms_norm(torch.randn(2, 8), torch.ones(5))


@pytest.mark.parametrize("backend", FUSED)
def test_offset_weight_matches_reference(backend):
    """Gemma's norm, scale 1 + weight: fused backends against the float64 reference, forward and backward."""
    dev = device_for(backend)
    x, dy = torch.randn(13, 200, device=dev) * 2, torch.randn(13, 200, device=dev)
    w = 0.3 * torch.randn(200, device=dev)
    y, dx, dw = _fwd_bwd(lambda a, b: rms_norm(a, b, 1e-6, offset=1.0, backend=backend), x, w, dy)
    exact = _fwd_bwd(lambda a, b: rms_norm_ref(a, b, 1e-6) , x.double(), 1 + w.double(), dy.double())
    for got, ref, tol in zip((y, dx, dw), exact, (1e-5, 1e-4, 1e-4), strict=True):
        assert_fp32_close(got, ref, tol)
    module = RMSNorm(200, offset=1.0)
    assert module.weight.abs().sum() == 0 and "offset=1.0" in repr(module)


@pytest.mark.parametrize("backend", FUSED)
def test_per_head_norm_of_a_projection_view(backend):
    """q/k norm (Qwen3, Gemma 3): over head_dim of a [T, H, D] view of a projection output."""
    dev = device_for(backend)
    proj = torch.randn(11, 4 * 16, device=dev)
    w = torch.randn(16, device=dev)
    dy = torch.randn(11, 4, 16, device=dev)
    got = _fwd_bwd(lambda a, b: rms_norm(a.view(11, 4, 16), b, backend=backend), proj, w, dy)
    exact = _fwd_bwd(lambda a, b: rms_norm_ref(a.view(11, 4, 16), b), proj.double(), w.double(), dy.double())
    for out, ref in zip(got, exact, strict=True):
        assert_fp32_close(out, ref, 1e-4)
