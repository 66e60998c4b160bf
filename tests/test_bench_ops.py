"""The rope / rmsnorm / swiglu benchmark steps run (tiny shapes, eager and packtune; compile is slow)."""

import pytest

from packtune.bench import rmsnorm, rope, swiglu


@pytest.mark.parametrize("impl", ["torch", "packtune"])
@pytest.mark.parametrize("module, shape", [
    (rope, {"T": 12, "heads": 4, "kv_heads": 2, "head_dim": 64, "sample_len": 4}),
    (rmsnorm, {"T": 5, "hidden": 96}),
    (swiglu, {"T": 5, "intermediate": 200}),
])
def test_bench_step_runs_forward_and_backward(module, shape, impl):
    step = module.make_step(impl, shape, "float32", "cpu")
    step()
    step()


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="unknown implementation"):
        rmsnorm.make_step("nope", {"T": 2, "hidden": 8}, "float32", "cpu")
