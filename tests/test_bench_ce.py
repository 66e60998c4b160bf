import torch

from packtune.bench import ce, linear_ce


def _run(module, impl, shape):
    torch.manual_seed(0)  # the same inputs for every implementation
    return module.make_step(impl, shape, "float32", "cpu")()


def test_ce_bench_steps_compute_the_same_gradient():
    shape = {"N": 8, "V": 50, "ignored": 0.25}
    (expected,), (got,) = _run(ce, "torch", shape), _run(ce, "packtune", shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert _run(ce, "packtune-inplace", shape)[0].shape == expected.shape


def test_linear_ce_bench_steps_agree():
    shape = {"N": 16, "H": 8, "V": 40, "ignored": 0.3}
    expected = _run(linear_ce, "torch", shape)
    for got, want in zip(_run(linear_ce, "packtune", shape), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
