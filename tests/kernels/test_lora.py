"""The fused LoRA linear and LoRA MLP against their float64 PyTorch references (values and gradients):
fp32 at the project's tolerances, bf16 no worse than PyTorch's own bf16, dropout masks seeded."""

import pytest
import torch
from kernel_checks import assert_fp32_close, assert_low_precision_close

from packtune.kernels.lora import dropout_mask, lora_linear, lora_linear_ref
from packtune.kernels.lora_mlp import lora_mlp, lora_mlp_ref


def _linear(n_in, n_out, rank, bias, dtype=torch.float32):
    w = torch.randn(n_out, n_in, dtype=dtype) / n_in**0.5
    b = torch.randn(n_out, dtype=dtype) if bias else None
    a = torch.randn(rank, n_in) / n_in**0.5
    bb = torch.randn(n_out, rank) / rank**0.5
    return w, b, a, bb


def _grads(fn, x, lin_params, dy):
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in lin_params]
    y = fn(x, params)
    y.backward(dy)
    return [y.detach(), x.grad, *[p.grad for p in params]]


def _double(ts):
    return [t.double() if t is not None else None for t in ts]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("shape", "n_out", "rank"), [((7, 24), 40, 4), ((2, 5, 64), 48, 16), ((1, 8), 8, 1)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_fp32_matches_float64_reference(shape, n_out, rank, bias, dropout):
    w, b, a, bb = _linear(shape[-1], n_out, rank, bias)
    x, dy = torch.randn(shape), torch.randn(*shape[:-1], n_out)

    def run(impl, dtype):
        wd, bd = w.to(dtype), None if b is None else b.to(dtype)
        return _grads(lambda x_, p: impl(x_, wd, bd, p[0], p[1], 2.5, dropout, 1234), x.to(dtype),
                      [a.to(dtype), bb.to(dtype)], dy.to(dtype))

    got, exact = run(lora_linear, torch.float32), run(lora_linear_ref, torch.float64)
    assert_fp32_close(got[0], exact[0], 1e-5)
    for g, e in zip(got[1:], exact[1:], strict=True):
        assert_fp32_close(g, e, 1e-4)


def test_lora_linear_bf16_no_worse_than_torch():
    w, b, a, bb = _linear(64, 96, 8, True)
    x, dy = torch.randn(33, 64), torch.randn(33, 96)
    bf = torch.bfloat16
    got = _grads(lambda x_, p: lora_linear(x_, w.to(bf), b.to(bf), p[0], p[1], 2.0), x.to(bf), [a, bb],
                 dy.to(bf))
    plain = _grads(lambda x_, p: lora_linear_ref(x_, w.to(bf), b.to(bf), p[0], p[1], 2.0), x.to(bf),
                   [a.to(bf), bb.to(bf)], dy.to(bf))
    exact = _grads(lambda x_, p: lora_linear_ref(x_, w.double(), b.double(), p[0], p[1], 2.0), x.double(),
                   [a.double(), bb.double()], dy.double())
    for g, t, e in zip(got, plain, exact, strict=True):
        assert_low_precision_close(g, t, e)


def test_lora_linear_never_makes_a_weight_gradient():
    w, b, a, bb = _linear(16, 12, 2, True)
    w.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    a.requires_grad_()
    bb.requires_grad_()
    lora_linear(x, w, b, a, bb, 1.0).sum().backward()
    assert w.grad is None and a.grad is not None and bb.grad is not None and x.grad is not None


def test_dropout_mask_is_a_function_of_the_seed():
    m1, m2 = (dropout_mask((64, 32), 0.25, 7, torch.device("cpu"), torch.float32) for _ in range(2))
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, dropout_mask((64, 32), 0.25, 8, torch.device("cpu"), torch.float32))
    assert m1.unique().tolist() == pytest.approx([0.0, 1 / 0.75])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(9, 32), (2, 6, 48)])
def test_lora_mlp_fp32_matches_float64_reference(shape, bias, dropout):
    hidden, inter, rank = shape[-1], 80, 8
    gate, up = _linear(hidden, inter, rank, bias), _linear(hidden, inter, rank, bias)
    down = _linear(inter, hidden, rank, bias)
    x, dy = torch.randn(shape) * 2, torch.randn(shape)
    seeds = (11, 12, 13)

    def run(impl, dtype):
        frozen = [[t if t is None else t.to(dtype) for t in lin[:2]] for lin in (gate, up, down)]
        adapters = [t.to(dtype) for lin in (gate, up, down) for t in lin[2:]]

        def fn(x_, p):
            lins = [(*frozen[i], p[2 * i], p[2 * i + 1]) for i in range(3)]
            return impl(x_, *lins, 0.75, dropout, seeds)

        return _grads(fn, x.to(dtype), adapters, dy.to(dtype))

    got, exact = run(lora_mlp, torch.float32), run(lora_mlp_ref, torch.float64)
    assert_fp32_close(got[0], exact[0], 1e-5)
    for g, e in zip(got[1:], exact[1:], strict=True):
        assert_fp32_close(g, e, 1e-4)
