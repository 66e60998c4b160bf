"""The rope / rmsnorm / swiglu benchmark steps compute the same gradients with packtune as with the
torch reference (tiny shapes; compile is slow)."""

import pytest
import torch

from packtune.bench import layernorm, rmsnorm, rope, swiglu


@pytest.mark.parametrize("module, shape", [
    (rope, {"T": 12, "heads": 4, "kv_heads": 2, "head_dim": 64, "sample_len": 4}),
    (rmsnorm, {"T": 5, "hidden": 96}),
    (swiglu, {"T": 5, "intermediate": 200, "activation": "silu"}),
    (swiglu, {"T": 5, "intermediate": 200, "activation": "gelu_tanh"}),
])
def test_bench_step_gradients_equal_the_reference(module, shape):
    grads = {}
    for impl in ("torch", "packtune"):
        torch.manual_seed(0)
        step = module.make_step(impl, shape, "float32", "cpu")
        step()
        step()  # twice: a step clears the previous gradients
        grads[impl] = [t.grad for t in step.inputs]
    for ours, ref in zip(grads["packtune"], grads["torch"], strict=True):
        assert ours is not None and ours.abs().sum() > 0
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_layernorm_bench_contenders_compute_torch_layer_norm():
    """The written-out LayerNorm (what `compile` compiles) equals F.layer_norm, values and gradients."""
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 96, dtype=torch.float64), torch.randn(96, dtype=torch.float64), torch.randn(96)
    ins = [t.double().requires_grad_() for t in (x, w, b)]
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    dy = torch.randn(5, 96, dtype=torch.float64)
    layernorm.layer_norm_composed(*ins).backward(dy)
    out = torch.nn.functional.layer_norm(ref[0], (96,), ref[1], ref[2], layernorm.EPS)
    out.backward(dy)
    torch.testing.assert_close(layernorm.layer_norm_composed(*ins), out)
    for a, e in zip(ins, ref, strict=True):
        torch.testing.assert_close(a.grad, e.grad)
    step = layernorm.make_step("torch", {"T": 3, "hidden": 16}, "float32", "cpu")
    step()
    assert all(t.grad is not None for t in step.inputs)


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="unknown implementation"):
        rmsnorm.make_step("nope", {"T": 2, "hidden": 8}, "float32", "cpu")
