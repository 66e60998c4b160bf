"""The fused LoRA linear and LoRA MLP against their float64 PyTorch references (values and gradients):
fp32 at the project's tolerances, bf16 no worse than PyTorch's own bf16, dropout masks seeded; the
Triton backend through the interpreter, its reference drawing the Triton kernels' masks."""

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


BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("shape", "n_out", "rank"), [((7, 24), 40, 4), ((2, 5, 64), 48, 16), ((1, 8), 8, 1)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_fp32_matches_float64_reference(shape, n_out, rank, bias, dropout, backend):
    w, b, a, bb = _linear(shape[-1], n_out, rank, bias)
    x, dy = torch.randn(shape), torch.randn(*shape[:-1], n_out)

    def run(dtype, **impl):
        fn = lora_linear if "backend" in impl else lora_linear_ref
        wd, bd = w.to(dtype), None if b is None else b.to(dtype)
        return _grads(lambda x_, p: fn(x_, wd, bd, p[0], p[1], 2.5, dropout, 1234, **impl), x.to(dtype),
                      [a.to(dtype), bb.to(dtype)], dy.to(dtype))

    got, exact = run(torch.float32, backend=backend), run(torch.float64)
    assert_fp32_close(got[0], exact[0], 1e-5)
    for g, e in zip(got[1:], exact[1:], strict=True):
        assert_fp32_close(g, e, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_linear_bf16_no_worse_than_torch(backend, dropout):
    w, b, a, bb = _linear(64, 96, 8, True)
    x, dy = torch.randn(33, 64), torch.randn(33, 96)
    bf = torch.bfloat16
    got = _grads(lambda x_, p: lora_linear(x_, w.to(bf), b.to(bf), p[0], p[1], 2.0, dropout, 5,
                                           backend=backend),
                 x.to(bf), [a, bb], dy.to(bf))
    plain = _grads(lambda x_, p: lora_linear_ref(x_, w.to(bf), b.to(bf), p[0], p[1], 2.0, dropout, 5),
                   x.to(bf), [a.to(bf), bb.to(bf)], dy.to(bf))
    exact = _grads(lambda x_, p: lora_linear_ref(x_, w.double(), b.double(), p[0], p[1], 2.0, dropout, 5),
                   x.double(), [a.double(), bb.double()], dy.double())
    for g, t, e in zip(got, plain, exact, strict=True):
        assert_low_precision_close(g, t, e, backend)


def test_lora_linear_never_makes_a_weight_gradient():
    w, b, a, bb = _linear(16, 12, 2, True)
    w.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    a.requires_grad_()
    bb.requires_grad_()
    lora_linear(x, w, b, a, bb, 1.0).sum().backward()
    assert w.grad is None and a.grad is not None and bb.grad is not None and x.grad is not None


def test_dropout_mask_is_a_function_of_the_seed():
    def mask(seed):
        return dropout_mask((64, 32), 0.25, seed, torch.device("cpu"), torch.float32)

    m1, m2 = mask(2**40 + 7), mask(2**40 + 7)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, mask(2**40 + 8))
    assert m1.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert abs((m1 == 0).float().mean().item() - 0.25) < 0.05


def _mlp_weights(hidden, inter, rank, bias, dtype=torch.float32):
    lins = (_linear(hidden, inter, rank, bias), _linear(hidden, inter, rank, bias),
            _linear(inter, hidden, rank, bias))
    frozen = [[t if t is None else t.to(dtype) for t in lin[:2]] for lin in lins]
    return frozen, [t for lin in lins for t in lin[2:]]


def _mlp_grads(fn, x, frozen, adapters, dy, adapter_dtype, **kwargs):
    def call(x_, p):
        lins = [(*frozen[i], p[2 * i], p[2 * i + 1]) for i in range(3)]
        return fn(x_, *lins, 0.75, seeds=(11, 12, 13), **kwargs)

    return _grads(call, x, [t.to(adapter_dtype) for t in adapters], dy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize(("shape", "bias"), [((9, 32), False), ((2, 6, 48), True)])
def test_lora_mlp_fp32_matches_float64_reference(shape, bias, dropout, activation, backend):
    frozen, adapters = _mlp_weights(shape[-1], 80, 8, bias)
    x, dy = torch.randn(shape) * 2, torch.randn(shape)
    got = _mlp_grads(lora_mlp, x, frozen, adapters, dy, torch.float32, dropout=dropout, activation=activation,
                     backend=backend)
    frozen64 = [[t if t is None else t.double() for t in lin] for lin in frozen]
    exact = _mlp_grads(lora_mlp_ref, x.double(), frozen64, adapters, dy.double(), torch.float64,
                       dropout=dropout,
                       activation=activation)
    # y is three chained fp32 GEMMs: within a few fp32 ulps (2^-23) of its largest entry
    torch.testing.assert_close(got[0].double(), exact[0], rtol=1e-5,
                               atol=2**-21 * exact[0].abs().max().item())
    for g, e in zip(got[1:], exact[1:], strict=True):
        assert_fp32_close(g, e, 1e-4)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_lora_mlp_triton_bf16_no_worse_than_torch(activation):
    bf = torch.bfloat16
    frozen, adapters = _mlp_weights(32, 48, 4, True, bf)
    x, dy = torch.randn(17, 32), torch.randn(17, 32)
    kwargs = {"dropout": 0.1, "activation": activation}
    got = _mlp_grads(lora_mlp, x.to(bf), frozen, adapters, dy.to(bf), torch.float32, backend="triton",
                     **kwargs)
    plain = _mlp_grads(lora_mlp_ref, x.to(bf), frozen, adapters, dy.to(bf), bf, **kwargs)
    frozen64 = [[t if t is None else t.double() for t in lin] for lin in frozen]
    exact = _mlp_grads(lora_mlp_ref, x.double(), frozen64, adapters, dy.double(), torch.float64, **kwargs)
    for g, t, e in zip(got, plain, exact, strict=True):
        assert_low_precision_close(g, t, e, "triton", chained_stores=3)


def test_lora_mlp_refuses_an_unknown_activation():
    frozen, adapters = _mlp_weights(16, 16, 2, False)
    lins = [(*frozen[i], adapters[2 * i], adapters[2 * i + 1]) for i in range(3)]
    with pytest.raises(ValueError, match="activation must be one of silu, gelu_tanh, got 'relu'"):
        lora_mlp(torch.randn(3, 16), *lins, 1.0, activation="relu")


@pytest.mark.parametrize("mlp", [False, True])
def test_triton_rank_tiles_and_row_splits_match_float64(mlp):
    """Rank 80 (two rank tiles of 64 and 16: dA tiled over rank, the rank contractions in two steps),
    70 rows (three row tiles, dA summed over two row splits), widths off the tile and off 4, dropout:
    values and gradients against float64, and two runs bitwise equal (no atomics in the reduction)."""
    n, hidden, inter, rank = 70, 36, 70, 80
    x, dy = torch.randn(n, hidden), torch.randn(n, hidden if mlp else inter)
    if mlp:
        frozen, adapters = _mlp_weights(hidden, inter, rank, True)
        run = lambda dtype, **kw: _mlp_grads(kw.pop("fn", lora_mlp), x.to(dtype),
                                             [[t.to(dtype) for t in lin] for lin in frozen], adapters,
                                             dy.to(dtype), dtype, dropout=0.1, **kw)
        got, again = run(torch.float32, backend="triton"), run(torch.float32, backend="triton")
        exact = run(torch.float64, fn=lora_mlp_ref)
    else:
        w, b, a, bb = _linear(hidden, inter, rank, True)

        def run(dtype, fn=lora_linear, **kw):
            return _grads(lambda x_, p: fn(x_, w.to(dtype), b.to(dtype), p[0], p[1], 0.5, 0.1, 21, **kw),
                          x.to(dtype), [a.to(dtype), bb.to(dtype)], dy.to(dtype))

        got, again = run(torch.float32, backend="triton"), run(torch.float32, backend="triton")
        exact = run(torch.float64, fn=lora_linear_ref)
    atol = 2**-20 * exact[0].abs().max().item()
    torch.testing.assert_close(got[0].double(), exact[0], rtol=1e-5, atol=atol)
    for g, e in zip(got[1:], exact[1:], strict=True):
        assert_fp32_close(g, e, 1e-4)
    assert all(torch.equal(g, h) for g, h in zip(got, again, strict=True))
