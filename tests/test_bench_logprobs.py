import torch

from packtune.bench import logprobs


def _grads(impl, shape):
    torch.manual_seed(0)  # the same inputs for every implementation
    return logprobs.make_step(impl, shape, "float32", "cpu")()


def test_logprobs_bench_steps_agree():
    """The fused step and the eager baseline differentiate the same thing (several segments, some rows
    without a label)."""
    shape = {"N": 50, "H": 8, "V": 40, "ignored": 0.3, "segment_len": 16}
    expected = _grads("torch", shape)
    for got, want in zip(_grads("packtune", shape), expected, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
