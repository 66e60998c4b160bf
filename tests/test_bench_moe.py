"""The MoE benchmark measures the same computation everywhere: at a tiny shape every implementation's
step gives packtune's gradients (so the timings compare like with like)."""

import pytest
import torch

from packtune.bench import moe

pytest.importorskip("transformers")


@pytest.mark.parametrize("model", sorted(moe.MODELS))
def test_every_implementation_computes_the_same_gradients(model):
    shape = {"model": model, "T": 10, "hidden": 32, "inter": 16, "experts": 6, "top_k": 2}
    grads = {}
    for impl in moe.IMPLS:
        torch.manual_seed(0)  # the same inputs for each
        step = moe.make_step(impl, shape, "float32", "cpu")
        step()
        grads[impl] = [t.grad.clone() for t in step.leaves]
    for impl in moe.IMPLS:
        for got, want in zip(grads[impl], grads["packtune"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
