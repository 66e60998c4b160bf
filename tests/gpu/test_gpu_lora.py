"""The Triton LoRA linear and LoRA MLP compiled on the GPU against the float64 reference (values,
dx, dA, dB; dropout on and off; fp32 / bf16 / fp16; odd shapes; x past 2^31 elements), and over
NF4 bases (QLoRA, the NF4 GEMM kernels at Llama-7B widths; skipped without torchao). Skipped
without CUDA."""

import pytest
import torch
from gpu_checks import DTYPES, assert_matches

from packtune.kernels.lora import lora_linear, lora_linear_ref
from packtune.kernels.lora_mlp import lora_mlp, lora_mlp_ref
from packtune.kernels.nf4_matmul import nf4_matmul, nf4_matmul_dx

pytestmark = pytest.mark.gpu


def _weights(n_in, n_out, rank):
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.float64) / n_in**0.5
    b = torch.randn(n_out, device="cuda", dtype=torch.float64)
    a = torch.randn(rank, n_in, device="cuda") / n_in**0.5
    bb = torch.randn(n_out, rank, device="cuda") / rank**0.5
    return w, b, a, bb


def _run(fn, x, frozen, adapters, dy, dtype):
    """(y, dx, *d adapters) of fn(x, frozen..., adapters...) with x and frozen in `dtype`."""
    x = x.detach().to(dtype).requires_grad_()  # a fresh leaf: x.to(x.dtype) would be x itself
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

    ref = _run(fn(lora_linear_ref), x, (w, b), (a.double(), bb.double()), dy,
               torch.float64)
    eager = _run(fn(lora_linear_ref), x, (w, b), (a.to(dtype), bb.to(dtype)), dy,
                 dtype)
    out = _run(fn(lora_linear), x, (w, b), (a, bb), dy, dtype)
    for rtol, got, e, r in zip((1e-5, 1e-4, 1e-4, 1e-4), out, eager, ref, strict=True):
        assert_matches(got, e, r, rtol, dtype, sum_terms=max(n, n_in, n_out))  # y: K = in, dx: out, dA/dB: N


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

    ref = _run(fn(lora_mlp_ref), x, frozen, [t.double() for t in adapters], dy,
               torch.float64)
    eager = _run(fn(lora_mlp_ref), x, frozen, [t.to(dtype) for t in adapters], dy,
                 dtype)
    out = _run(fn(lora_mlp), x, frozen, adapters, dy, dtype)
    for i, (got, e, r) in enumerate(zip(out, eager, ref, strict=True)):
        # y is three chained GEMMs: fp32 within a few ulps of its largest entry (the CPU test's bound)
        rtol = 1e-4 if i else 5e-5
        assert_matches(got, e, r, rtol, dtype, sum_terms=inter)


@pytest.mark.slow  # gpu-check --quick leaves the > 2^31-element shapes out
def test_lora_linear_past_2_31_elements():
    """x [524289, 4096] bf16 (2^31 + 4096 elements): int64 offsets in the down, up and dA kernels and
    in the dropout mask (Philox counters past 2^32: both words); against the reference's torch mask."""
    n, n_in, n_out, rank = 2**31 // 4096 + 1, 4096, 64, 16
    w, b, a, bb = _weights(n_in, n_out, rank)
    x = torch.randn(n, n_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(n, n_out, device="cuda", dtype=torch.bfloat16)
    frozen = (w.bfloat16(), b.bfloat16())
    got = _run(lambda x_, f, p: lora_linear(x_, *f, *p, 2.0, 0.1, 5), x, frozen, (a, bb), dy, torch.bfloat16)
    ref = _run(lambda x_, f, p: lora_linear_ref(x_, *f, *p, 2.0, 0.1, 5), x, frozen, (a, bb), dy,
               torch.bfloat16)
    for g, r in zip(got, ref, strict=True):
        assert torch.isfinite(g).all()
        err = (g.float() - r.float()).abs().max().item()
        assert err <= 2e-2 * r.float().abs().max().item(), err


@pytest.mark.parametrize("mlp", [False, True])
def test_rank_256_adapters_and_deterministic_da(mlp):
    """Rank 256 (four rank tiles of 64: dA tiled over rank, no spilled accumulators) at Llama-7B
    widths in bf16 with dropout: within PyTorch's own bf16 error of float64, and a second backward
    bitwise equal (dA reduced over row splits in a fixed order, no atomics)."""
    hidden, inter, rank, n = 4096, 11008, 256, 2048
    if mlp:
        lins = [_weights(hidden, inter, rank), _weights(hidden, inter, rank), _weights(inter, hidden, rank)]
        frozen, adapters = [t for lin in lins for t in lin[:2]], [t for lin in lins for t in lin[2:]]

        def fn(impl):
            def call(x_, f, p):
                gate, up, down = ((f[2 * i], f[2 * i + 1], p[2 * i], p[2 * i + 1]) for i in range(3))
                return impl(x_, gate, up, down, 0.5, 0.1, (4, 5, 6))
            return call
        impl, ref_impl, out_features = lora_mlp, lora_mlp_ref, hidden
    else:
        w, b, a, bb = _weights(hidden, inter, rank)
        frozen, adapters = (w, b), (a, bb)

        def fn(impl):
            return lambda x_, f, p: impl(x_, f[0], f[1], p[0], p[1], 2.0, 0.1, 9)
        impl, ref_impl, out_features = lora_linear, lora_linear_ref, inter
    x, dy = (torch.randn(n, k, device="cuda", dtype=torch.float64) for k in (hidden, out_features))
    bf = torch.bfloat16
    got, again = (_run(fn(impl), x, frozen, adapters, dy, bf) for _ in range(2))
    eager = _run(fn(ref_impl), x, frozen, [t.to(bf) for t in adapters], dy, bf)
    exact = _run(fn(ref_impl), x, frozen, [t.double() for t in adapters], dy, torch.float64)
    for g, e, r in zip(got, eager, exact, strict=True):
        assert_matches(g, e, r, 1e-4, bf)
    assert all(torch.equal(g, h) for g, h in zip(got, again, strict=True))


def test_kernel_dropout_masks_are_the_torch_mask():
    """This Triton's compiled Philox (tl.randint4x) draws the mask the references draw in torch."""
    from packtune.kernels.dropout import dropout_mask
    from packtune.kernels.lora import lora_down

    n, n_in = 1000, 4096
    eye = torch.eye(n_in, device="cuda")[:64]  # u = drop(x) A^T with A = the first 64 unit rows
    x = torch.ones(n, n_in, device="cuda")
    seed = torch.tensor(2**40 + 3, device="cuda")
    expected = dropout_mask((n, n_in), 0.25, seed, "cuda", torch.float32)[:, :64]
    torch.testing.assert_close(lora_down(x, eye, 0.25, seed), expected, rtol=1e-6, atol=0)


def _nf4(n_out, n_in):
    """A QLoRA base weight on the GPU: torchao's NF4 tensor, quantised by packtune's `to_nf4`."""
    pytest.importorskip("torchao", reason="the NF4 tensor is torchao's (the qlora extra)")
    from packtune.lora.qlora import to_nf4

    return to_nf4(torch.randn(n_out, n_in, device="cuda") / n_in**0.5)


def _forbid_dense_dequantise(monkeypatch, weight):
    """What runs after this reads the NF4 codes itself: torchao's whole-layer dequantisation fails."""
    monkeypatch.setattr(type(weight), "get_original_weight",
                        lambda self: pytest.fail("the NF4 weight was dequantised whole"))


@pytest.mark.parametrize("n_out,n_in", [(11008, 4096), (4096, 11008)])
def test_nf4_matmul_7b_widths(n_out, n_in, monkeypatch):
    """QLoRA's base GEMMs at Llama-7B widths in bf16: the values dequantised in registers are
    torchao's bit for bit (I deq(W)^T and I deq(W): one nonzero product per output), and y, dx
    against float64 no worse than dequantise + matmul (odd N)."""
    w = _nf4(n_out, n_in)
    dense = w.get_original_weight()
    b = torch.randn(n_out, device="cuda")
    x, dy = torch.randn(1001, n_in, device="cuda"), torch.randn(1001, n_out, device="cuda")

    def run(fn, weight, dtype):
        x_ = x.to(dtype).requires_grad_()
        y = fn(x_, weight, b.to(dtype))
        y.backward(dy.to(dtype))
        return y.detach(), x_.grad

    ref = run(torch.nn.functional.linear, dense.double(), torch.float64)
    eager = run(torch.nn.functional.linear, dense, torch.bfloat16)
    _forbid_dense_dequantise(monkeypatch, w)
    out = run(nf4_matmul, w, torch.bfloat16)
    for got, e, r in zip(out, eager, ref, strict=True):
        assert_matches(got, e, r, 1e-5, torch.bfloat16)
    eye = torch.eye(max(n_in, n_out), device="cuda", dtype=torch.bfloat16)
    assert torch.equal(nf4_matmul(eye[:n_in, :n_in], w).t(), dense)
    assert torch.equal(nf4_matmul_dx(eye[:n_out, :n_out], w), dense)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_linear_and_mlp_over_nf4_7b_widths(dropout, monkeypatch):
    """The LoRA linear (4096 -> 11008) and LoRA MLP (4096, 11008) over NF4 bases in bf16 (values,
    dx, dA, dB) against float64 over the dequantised bases, no worse than PyTorch over them."""
    hidden, inter, rank, n = 4096, 11008, 16, 515
    bases = [_nf4(inter, hidden), _nf4(inter, hidden), _nf4(hidden, inter)]
    dense = [w.get_original_weight() for w in bases]
    adapters = [t for n_in, n_out in ((hidden, inter), (hidden, inter), (inter, hidden))
                for t in _weights(n_in, n_out, rank)[2:]]

    def mlp(impl, weights, **kw):
        def call(x_, _, p):
            gate, up, down = ((weights[i], None, p[2 * i], p[2 * i + 1]) for i in range(3))
            return impl(x_, gate, up, down, 0.5, dropout, (1, 2, 3), "silu", **kw)
        return call

    def linear(impl, weights, **kw):
        return lambda x_, _, p: impl(x_, weights[0], None, p[0], p[1], 2.0, dropout, 77, **kw)

    for call, impl, reference, n_out, n_adapters in ((mlp, lora_mlp, lora_mlp_ref, hidden, 6),
                                                     (linear, lora_linear, lora_linear_ref, inter, 2)):
        x, dy = (torch.randn(n, k, device="cuda", dtype=torch.float64) for k in (hidden, n_out))
        ref = _run(call(reference, [d.double() for d in dense]), x, (),
                   [t.double() for t in adapters[:n_adapters]], dy, torch.float64)
        eager = _run(call(reference, dense), x, (),
                     [t.bfloat16() for t in adapters[:n_adapters]], dy, torch.bfloat16)
        with monkeypatch.context() as patch:
            for w in bases:
                _forbid_dense_dequantise(patch, w)
            out = _run(call(impl, bases), x, (), adapters[:n_adapters], dy, torch.bfloat16)
        for got, e, r in zip(out, eager, ref, strict=True):
            assert_matches(got, e, r, 1e-4, torch.bfloat16)
