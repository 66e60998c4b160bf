"""The Triton LoRA linear and LoRA MLP compiled on the GPU against the float64 reference (values,
dx, dA, dB; dropout on and off; fp32 / bf16 / fp16; odd shapes; x past 2^31 elements). Skipped
without CUDA."""

import pytest
import torch
from gpu_checks import DTYPES, assert_matches

from packtune.kernels.lora import lora_linear, lora_linear_ref
from packtune.kernels.lora_mlp import lora_mlp, lora_mlp_ref

pytestmark = pytest.mark.gpu


def _weights(n_in, n_out, rank):
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.float64) / n_in**0.5
    b = torch.randn(n_out, device="cuda", dtype=torch.float64)
    a = torch.randn(rank, n_in, device="cuda") / n_in**0.5
    bb = torch.randn(n_out, rank, device="cuda") / rank**0.5
    return w, b, a, bb


def _run(fn, x, frozen, adapters, dy, dtype):
    """(y, dx, *d adapters) of fn(x, frozen..., adapters...) with x and frozen in `dtype`."""
    x = x.to(dtype).requires_grad_()
    leaves = [t.detach().clone().requires_grad_() for t in adapters]
    y = fn(x, [t if t is None else t.to(dtype) for t in frozen], leaves)
    y.backward(dy.to(dtype))
    return [y.detach(), x.grad, *[t.grad for t in leaves]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("n,n_in,n_out,rank", [(1, 7, 5, 1), (257, 4096, 1000, 16), (1000, 1024, 2752, 64)])
def test_lora_linear(dtype, dropout, n, n_in, n_out, rank):
    w, b, a, bb = _weights(n_in, n_out, rank)
    x, dy = (torch.randn(n, k, device="cuda", dtype=torch.float64) for k in (n_in, n_out))

    def fn(impl, **kw):
        return lambda x_, f, p: impl(x_, f[0], f[1], p[0], p[1], 2.0, dropout, 77, **kw)

    ref = _run(fn(lora_linear_ref, mask_backend="triton"), x, (w, b), (a.double(), bb.double()), dy,
               torch.float64)
    eager = _run(fn(lora_linear_ref, mask_backend="triton"), x, (w, b), (a.to(dtype), bb.to(dtype)), dy,
                 dtype)
    out = _run(fn(lora_linear), x, (w, b), (a, bb), dy, dtype)
    for rtol, got, e, r in zip((1e-5, 1e-4, 1e-4, 1e-4), out, eager, ref, strict=True):
        assert_matches(got, e, r, rtol, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_mlp(dtype, activation, dropout):
    hidden, inter, rank, n = 1024, 2752, 16, 515
    lins = [_weights(hidden, inter, rank), _weights(hidden, inter, rank), _weights(inter, hidden, rank)]
    x, dy = (torch.randn(n, hidden, device="cuda", dtype=torch.float64) for _ in range(2))
    frozen = [t for lin in lins for t in lin[:2]]
    adapters = [t for lin in lins for t in lin[2:]]

    def fn(impl, **kw):
        def call(x_, f, p):
            gate, up, down = ((f[2 * i], f[2 * i + 1], p[2 * i], p[2 * i + 1]) for i in range(3))
            return impl(x_, gate, up, down, 0.5, dropout, (1, 2, 3), activation, **kw)
        return call

    ref = _run(fn(lora_mlp_ref, mask_backend="triton"), x, frozen, [t.double() for t in adapters], dy,
               torch.float64)
    eager = _run(fn(lora_mlp_ref, mask_backend="triton"), x, frozen, [t.to(dtype) for t in adapters], dy,
                 dtype)
    out = _run(fn(lora_mlp), x, frozen, adapters, dy, dtype)
    for i, (got, e, r) in enumerate(zip(out, eager, ref, strict=True)):
        # y is three chained GEMMs: fp32 within a few ulps of its largest entry (the CPU test's bound)
        rtol = 1e-4 if i else 5e-5
        assert_matches(got, e, r, rtol, dtype)


def test_lora_linear_past_2_31_elements():
    """x [524289, 4096] bf16 (2^31 + 4096 elements): int64 offsets in the down, up and dA kernels and
    in the dropout mask; against the torch backend drawing the Triton mask."""
    n, n_in, n_out, rank = 2**31 // 4096 + 1, 4096, 64, 16
    w, b, a, bb = _weights(n_in, n_out, rank)
    x = torch.randn(n, n_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(n, n_out, device="cuda", dtype=torch.bfloat16)
    frozen = (w.bfloat16(), b.bfloat16())
    got = _run(lambda x_, f, p: lora_linear(x_, *f, *p, 2.0, 0.1, 5), x, frozen, (a, bb), dy, torch.bfloat16)
    ref = _run(lambda x_, f, p: lora_linear_ref(x_, *f, *p, 2.0, 0.1, 5, "triton"), x, frozen, (a, bb), dy,
               torch.bfloat16)
    for g, r in zip(got, ref, strict=True):
        assert torch.isfinite(g).all()
        err = (g.float() - r.float()).abs().max().item()
        assert err <= 2e-2 * r.float().abs().max().item(), err
