import pytest
import torch

from packtune.bench import logprobs


def _grads(impl, shape):
    torch.manual_seed(0)  # the same inputs for every implementation
    return logprobs.make_step(impl, shape, "float32", "cpu")()


@pytest.mark.parametrize("frozen", [False, True])
def test_logprobs_bench_steps_agree(frozen):
    """The fused step and the eager baseline differentiate the same thing (several segments, some rows
    without a label), dHidden and dW, or with the lm_head frozen dHidden alone."""
    shape = {"N": 50, "H": 8, "V": 40, "ignored": 0.3, "segment_len": 16, "frozen_weight": frozen}
    expected = _grads("torch", shape)
    assert len(expected) == (1 if frozen else 2)
    for got, want in zip(_grads("packtune", shape), expected, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_from_logits_steps_agree():
    """--from-logits: logprobs, also in place, and TRL's selective_log_softmax (logprobs_ref)
    differentiate the same thing, and the in-place step's repeated calls start from the same logits."""
    shape = {"N": 50, "V": 40, "ignored": 0.3, "segment_len": 16, "from_logits": True}
    (want,) = _grads("torch", shape)
    assert want.abs().sum() > 0
    for impl in ("packtune", "packtune-inplace"):
        (got,) = _grads(impl, shape)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
