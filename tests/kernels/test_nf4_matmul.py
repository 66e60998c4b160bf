"""The NF4 GEMMs (QLoRA's frozen base) against a float64 reference over torchao's dequantised weight:
forward and dx, fp32 and bf16 activations, the Triton kernels through the interpreter; their
dequantised values bitwise torchao's; the LoRA linear and LoRA MLP over an NF4 base on the triton
backend equal to the same over the dense dequantised base. The Triton runs forbid torchao's
whole-layer dequantisation, so they prove the kernels read the packed codes themselves."""

import pytest
import torch
from kernel_checks import assert_low_precision_close

pytest.importorskip("torchao", reason="the NF4 tensor is torchao's (the qlora extra: pip install torchao)")

from packtune.kernels.lora import lora_linear  # noqa: E402
from packtune.kernels.lora_mlp import lora_mlp  # noqa: E402
from packtune.kernels.nf4_matmul import (  # noqa: E402
    nf4_dequantize,
    nf4_kernel_fits,
    nf4_matmul,
    nf4_matmul_dx,
    nf4_matmul_forward,
    nf4_path,
)
from packtune.lora.qlora import to_nf4  # noqa: E402

SMALL = (16, 32, 32)
"""Blocks small enough for several tiles at the tests' shapes (the default ones cover one)."""


def assert_sums_close(out, ref64, k):
    """fp32 results of k-term sums (GEMMs) against float64: within k fp32 roundings (2^-24 each) of
    the largest entry, the worst case of a k-term sum in any order (the project's fp32 bar,
    1e-7 x the largest entry, holds for short sums only; torch's BLAS misses it at k = 256)."""
    assert out.dtype == torch.float32
    atol = k * 2**-24 * ref64.abs().max().item()
    torch.testing.assert_close(out.double(), ref64.double(), rtol=1e-5, atol=atol)


def _nf4(n_out, n_in):
    return to_nf4(torch.randn(n_out, n_in) / n_in**0.5)


@pytest.fixture
def no_dense_dequantise(monkeypatch):
    """Make torchao's whole-layer dequantisation fail: what runs under it reads the codes itself."""
    def refuse(self):
        raise AssertionError("the NF4 weight was dequantised whole")

    def forbid(weight):
        monkeypatch.setattr(type(weight), "get_original_weight", refuse)

    return forbid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocks", [SMALL, None])
def test_dequantised_values_are_torchaos_bitwise(dtype, blocks, no_dense_dequantise):
    """deq(W)^T = I deq(W)^T and deq(W) = I deq(W): one nonzero product per output, exact."""
    w = _nf4(96, 128)
    expected = w.get_original_weight().to(dtype)
    no_dense_dequantise(w)
    kw = {} if blocks is None else {"blocks": blocks}
    assert torch.equal(nf4_matmul_forward(torch.eye(128, dtype=dtype), w, **kw).t(), expected)
    assert torch.equal(nf4_matmul_dx(torch.eye(96, dtype=dtype), w, **kw), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantise_kernel_is_torchaos_bitwise(dtype, no_dense_dequantise):
    """The dequantise + cuBLAS path's scratch weight: torchao's values bit for bit."""
    w = _nf4(96, 256)
    expected = w.get_original_weight().to(dtype)
    no_dense_dequantise(w)
    assert torch.equal(nf4_dequantize(w, dtype), expected)
    assert torch.equal(nf4_dequantize(w, dtype, blocks=(32, 16)), expected)


def test_grouped_launch_order_covers_every_tile():
    """150 rows in 16-row tiles: ten row tiles, so the grouped order (groups of 8) has a partial
    last group; every output tile is written once (against float64)."""
    w = _nf4(96, 128)
    w64 = w.get_original_weight().double()
    x, g = torch.randn(150, 128), torch.randn(150, 96)
    assert_sums_close(nf4_matmul_forward(x, w, blocks=SMALL), x.double() @ w64.t(), 128)
    assert_sums_close(nf4_matmul_dx(g, w, blocks=SMALL), g.double() @ w64, 96)


def test_scales_are_expanded_once_per_weight(monkeypatch):
    """The double-quantised scales are expanded on the first call and reused (forward, dx, later
    steps), and expanded again after an in-place change of the quantised scales."""
    w = _nf4(64, 128)
    calls = []
    expand = type(w).dequantize_scalers
    monkeypatch.setattr(type(w), "dequantize_scalers", lambda self, *a: calls.append(1) or expand(self, *a))
    x = torch.randn(5, 128)
    first = nf4_matmul_forward(x, w)
    nf4_matmul_forward(x, w)
    nf4_matmul_dx(torch.randn(5, 64), w)
    assert len(calls) == 1
    w.quantized_scalers.neg_()
    assert not torch.equal(nf4_matmul_forward(x, w), first) and len(calls) == 2


def test_dequantise_path_when_chosen(monkeypatch, no_dense_dequantise):
    """PACKTUNE_NF4_PATH=dequant (what `nf4_path` picks where cuBLAS wins): the LoRA linear's base
    GEMMs go through the scratch weight, with the kernel path's results; a bad value is refused;
    the interpreter's own choice is the kernel."""
    w = _nf4(96, 128)
    adapters = _adapters(128, 96, 4)
    x, dy = torch.randn(21, 128), torch.randn(21, 96)
    assert nf4_path("forward", x, w) == "kernel"
    no_dense_dequantise(w)

    def run():
        call = lambda x_, p: lora_linear(x_, w, None, *p, 2.0, 0.1, 3, backend="triton")
        return _lora_grads(call, x, adapters, dy)

    kernel = run()
    monkeypatch.setenv("PACKTUNE_NF4_PATH", "dequant")
    assert nf4_path("dx", dy, w) == "dequant"
    for got, want in zip(run(), kernel, strict=True):
        assert_sums_close(got, want.double(), 128)
    monkeypatch.setenv("PACKTUNE_NF4_PATH", "fast")
    with pytest.raises(ValueError, match="PACKTUNE_NF4_PATH='fast'; choose from kernel, dequant"):
        nf4_path("forward", x, w)


def _grads(fn, x, bias, dy):
    x = x.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    y = fn(x, bias)
    y.backward(dy)
    return y.detach(), x.grad, bias.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("n_out", "n_in"), [(96, 256), (192, 128)])
def test_nf4_matmul_fp32_matches_float64_reference(n_out, n_in, backend, no_dense_dequantise):
    w = _nf4(n_out, n_in)
    w64 = w.get_original_weight().double()
    x, b, dy = torch.randn(5, 8, n_in), torch.randn(n_out), torch.randn(5, 8, n_out)
    exact = _grads(lambda x_, b_: torch.nn.functional.linear(x_, w64, b_), x.double(), b.double(),
                   dy.double())
    if backend == "triton":
        no_dense_dequantise(w)
    got = _grads(lambda x_, b_: nf4_matmul(x_, w, b_, backend=backend), x, b, dy)
    assert_sums_close(got[0], exact[0], n_in + 1)
    assert_sums_close(got[1], exact[1], n_out)
    assert_sums_close(got[2], exact[2], 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_kernels_on_several_tiles_odd_rows(dtype, no_dense_dequantise):
    """N = 40 rows (odd multiples of nothing), partial row and output tiles, several K steps."""
    w = _nf4(96, 256)
    w64 = w.get_original_weight().double()
    x, g = torch.randn(40, 256), torch.randn(40, 96)
    dense = w.get_original_weight().to(dtype)
    plain = (x.to(dtype) @ dense.t(), g.to(dtype) @ dense)
    exact = (x.double() @ w64.t(), g.double() @ w64)
    no_dense_dequantise(w)
    got = (nf4_matmul_forward(x.to(dtype), w, blocks=SMALL), nf4_matmul_dx(g.to(dtype), w, blocks=SMALL))
    for out, torch_out, ref, k in zip(got, plain, exact, (256, 96), strict=True):
        if dtype == torch.float32:
            assert_sums_close(out, ref, k)
        else:
            assert_low_precision_close(out, torch_out, ref, "triton")


def test_a_layer_whose_rows_are_not_whole_blocks_dequantises_per_layer():
    w = _nf4(64, 96)  # 96 blocks of 64 weights, rows of 1.5 blocks
    assert not nf4_kernel_fits(w) and nf4_kernel_fits(_nf4(64, 128))
    x = torch.randn(7, 96)
    expected = x.double() @ w.get_original_weight().double().t()
    assert_sums_close(nf4_matmul(x, w, backend="triton"), expected, 96)


def test_nf4_matmul_refuses_a_plain_weight_and_a_width_mismatch():
    with pytest.raises(TypeError, match="weight must be a torchao NF4 tensor, got Tensor"):
        nf4_matmul(torch.randn(2, 64), torch.randn(64, 64))
    with pytest.raises(ValueError, match="x has 32 features, the weight takes 64"):
        nf4_matmul(torch.randn(2, 32), _nf4(64, 64))


def _lora_grads(fn, x, adapters, dy):
    x = x.detach().requires_grad_()
    leaves = [t.detach().clone().requires_grad_() for t in adapters]
    y = fn(x, leaves)
    y.backward(dy)
    return [y.detach(), x.grad, *[t.grad for t in leaves]]


def _adapters(n_in, n_out, rank):
    return [torch.randn(rank, n_in) / n_in**0.5, torch.randn(n_out, rank) / rank**0.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_over_nf4_equals_the_dense_dequantised_base(dtype, no_dense_dequantise):
    w, b = _nf4(192, 128), torch.randn(192)
    dense = w.get_original_weight()
    adapters = _adapters(128, 192, 8)
    x, dy = torch.randn(3, 13, 128), torch.randn(3, 13, 192)

    def run(weight, x_dtype):
        def call(x_, p):
            return lora_linear(x_, weight, b.to(x_dtype), *p, 2.0, 0.1, 9, backend="triton")
        return _lora_grads(call, x.to(x_dtype), adapters, dy.to(x_dtype))

    exact = run(dense.double(), torch.float64)
    plain = run(dense, dtype)
    no_dense_dequantise(w)
    got = run(w, dtype)
    for out, torch_out, ref in zip(got, plain, exact, strict=True):
        if dtype == torch.float32:
            assert_sums_close(out, torch_out, 192)
            assert_sums_close(out, ref, 192)
        else:
            assert_low_precision_close(out, torch_out, ref, "triton")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_lora_mlp_over_nf4_equals_the_dense_dequantised_base(activation, no_dense_dequantise):
    hidden, inter, rank = 128, 192, 4
    bases = [_nf4(inter, hidden), _nf4(inter, hidden), _nf4(hidden, inter)]
    dense = [w.get_original_weight().float() for w in bases]
    adapters = [t for n_in, n_out in ((hidden, inter), (hidden, inter), (inter, hidden))
                for t in _adapters(n_in, n_out, rank)]
    x, dy = torch.randn(37, hidden), torch.randn(37, hidden)

    def run(weights):
        def call(x_, p):
            gate, up, down = ((weights[i], None, p[2 * i], p[2 * i + 1]) for i in range(3))
            return lora_mlp(x_, gate, up, down, 0.5, 0.1, (1, 2, 3), activation, backend="triton")
        return _lora_grads(call, x, adapters, dy)

    plain = run(dense)
    for w in bases:
        no_dense_dequantise(w)
    got = run(bases)
    for out, torch_out in zip(got, plain, strict=True):
        assert_sums_close(out, torch_out, 3 * inter)  # three chained GEMMs, each summed in another order
