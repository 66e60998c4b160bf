"""masked_cross_entropy on every backend against the float64 PyTorch reference.

Tolerances (docs/kernels.md): fp32 loss within 1e-5 relative, gradients within 1e-4 (relative to the
largest gradient entry); bf16 no worse than PyTorch's own bf16 F.cross_entropy error plus 1e-2.
"triton" runs through the interpreter on CPU (TRITON_INTERPRET=1, set in conftest.py); this
kernel has no tl.dot, so the interpreter's bf16 dot gap does not touch it.
"""

import pytest
import torch
import torch.nn.functional as F

from packtune.kernels import MaskedCrossEntropy, _dispatch, masked_cross_entropy
from packtune.kernels.cross_entropy import masked_cross_entropy_ref

BACKENDS = [b for b in ("triton", "cpu", "torch") if _dispatch.backend_runs_on(b, torch.device("cpu"))]
OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 4.0},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 6.0},
}


def make_inputs(n, v, ignored=0.3, ignore_index=-100, scale=3.0):
    logits = torch.randn(n, v, dtype=torch.float64) * scale
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignored] = ignore_index
    return logits, labels


def run(backend, logits, labels, dtype=torch.float32, grad_output=None, **kw):
    """Loss and logits.grad from one backend, on a fresh leaf copy of `logits` in `dtype`."""
    x = logits.to(dtype).clone().requires_grad_()
    loss = masked_cross_entropy(x, labels, backend=backend, **kw)
    loss.backward(grad_output if grad_output is not None else torch.ones_like(loss))
    return loss, x.grad


def reference(logits, labels, grad_output=None, **kw):
    x = logits.clone().requires_grad_()
    loss = masked_cross_entropy_ref(x, labels, **kw)
    loss.backward(grad_output.double() if grad_output is not None else torch.ones_like(loss))
    return loss, x.grad


def assert_fp32_close(loss, grad, ref_loss, ref_grad):
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    atol = 1e-4 * ref_grad.abs().max().item() + 1e-12
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=atol)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_matches_float64_reference(backend, option, reduction):
    logits, labels = make_inputs(37, 1000)  # V not a multiple of any power-of-two block
    kw = dict(OPTIONS[option], reduction=reduction)
    go = torch.randn(37) if reduction == "none" else None
    expected = reference(logits, labels, go, **kw)
    assert_fp32_close(*run(backend, logits, labels, grad_output=go, **kw), *expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_bf16_no_worse_than_torch_bf16(backend, option):
    logits, labels = make_inputs(33, 3001)
    kw = OPTIONS[option]
    ref_loss, ref_grad = reference(logits, labels, **kw)
    loss, grad = run(backend, logits, labels, torch.bfloat16, **kw)
    torch_loss, torch_grad = run("torch", logits, labels, torch.bfloat16, **kw)
    if option == "plain":  # PyTorch's own bf16 path as the yardstick, where it has the option
        x = logits.bfloat16().requires_grad_()
        torch_loss = F.cross_entropy(x, labels)
        torch_loss.backward()
        torch_grad = x.grad
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert (loss.double() - ref_loss).abs() <= (torch_loss.double() - ref_loss).abs() + 1e-2
    assert (grad.double() - ref_grad).abs().max() <= (torch_grad.double() - ref_grad).abs().max() + 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_vocab_blocks_and_one_row(backend):
    # V = 10007 spans two Triton blocks of 8192 plus a masked tail; N = 1.
    for n, v in ((3, 10007), (1, 777)):
        logits, labels = make_inputs(n, v, ignored=0.0)
        expected = reference(logits, labels, softcap=10.0)
        assert_fp32_close(*run(backend, logits, labels, softcap=10.0), *expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_all_ignored_gives_zero_loss_and_zero_grad(backend, reduction, inplace):
    logits = torch.randn(6, 300) * 5
    labels = torch.full((6,), -100)
    for num_items in (None, 0, torch.tensor(0)):
        x = logits.clone().requires_grad_()
        loss = masked_cross_entropy(x, labels, reduction=reduction, num_items=num_items, backend=backend,
                                    z_loss=1e-3, inplace_backward=inplace)
        loss.sum().backward()
        assert torch.equal(loss, torch.zeros_like(loss)), loss
        assert torch.equal(x.grad, torch.zeros_like(x)), x.grad.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-1, 7])
def test_other_ignore_index_and_none_ignored(backend, ignore_index):
    logits, labels = make_inputs(20, 500, ignore_index=ignore_index)
    kw = dict(ignore_index=ignore_index, label_smoothing=0.1)
    assert_fp32_close(*run(backend, logits, labels, **kw), *reference(logits, labels, **kw))
    clean = torch.randint(8, 500, (20,))  # no label equals ignore_index
    assert_fp32_close(*run(backend, logits, clean, **kw), *reference(logits, clean, **kw))
    assert_fp32_close(*run(backend, logits, clean, ignore_index=ignore_index),
                      F.cross_entropy(logits, clean), reference(logits, clean)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_and_grad_output(backend):
    logits, labels = make_inputs(24, 640)
    for num_items, reduction in ((torch.tensor(100), "mean"), (57, "sum"), (torch.tensor(9.0), "none")):
        go = torch.randn(24) if reduction == "none" else torch.tensor(-2.5)
        kw = dict(num_items=num_items, reduction=reduction, z_loss=1e-3)
        expected = reference(logits, labels, go, **kw)
        assert_fp32_close(*run(backend, logits, labels, grad_output=go, **kw), *expected)
    valid_sum = F.cross_entropy(logits, labels, reduction="sum")
    loss, _ = run(backend, logits, labels, reduction="sum", num_items=torch.tensor(40))
    torch.testing.assert_close(loss.double(), valid_sum / 40, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batched_logits(backend):
    wide, labels = make_inputs(16, 900)
    ref = reference(wide[:, :700], labels.clamp(max=699), softcap=5.0)
    sliced = wide.float()[:, :700].detach().requires_grad_()  # row stride 900: used without a copy
    loss = masked_cross_entropy(sliced, labels.clamp(max=699), backend=backend, softcap=5.0)
    loss.backward()
    assert_fp32_close(loss, sliced.grad, *ref)
    transposed = wide.float().t().contiguous().t().detach().requires_grad_()  # column stride 16: copied
    batched_labels = labels.view(4, 4)
    loss = masked_cross_entropy(transposed.unflatten(0, (4, 4)), batched_labels, backend=backend)
    loss.backward()
    assert_fp32_close(loss, transposed.grad, *reference(wide, labels))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_inplace_backward_reuses_logits_storage_and_default_keeps_logits(backend):
    logits, labels = make_inputs(12, 400)
    ref_loss, ref_grad = reference(logits, labels)
    x = logits.float().requires_grad_()
    before = x.detach().clone()
    loss = masked_cross_entropy(x, labels, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(x.detach(), before) and grad.data_ptr() != x.data_ptr()
    assert_fp32_close(loss, grad, ref_loss, ref_grad)
    loss = masked_cross_entropy(x, labels, backend=backend, inplace_backward=True)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.data_ptr() == x.data_ptr()  # the gradient lives in the logits' own storage
    assert_fp32_close(loss, grad, ref_loss, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_and_module(backend):
    logits, labels = make_inputs(10, 256)
    module = MaskedCrossEntropy(reduction="none", return_lse=True, backend=backend)
    loss, lse = module(logits.float(), labels)
    valid = labels != -100
    expected_lse = torch.where(valid, logits.logsumexp(-1), 0.0)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-6)
    expected_loss = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    assert "return_lse=True" in repr(module)
    int32_loss = masked_cross_entropy(logits.float(), labels.int(), backend=backend)
    torch.testing.assert_close(int32_loss.double(), F.cross_entropy(logits, labels), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_under_torch_compile(backend, inplace):
    logits, labels = make_inputs(16, 300)
    weights = make_weights(16) if inplace else None  # the weighted path, traced once per op
    ref_loss, ref_grad = reference(logits, labels, label_smoothing=0.1, weights=weights)

    def step(x, labels, weights):
        return masked_cross_entropy(x * 1.0, labels, weights=weights, label_smoothing=0.1, backend=backend,
                                    inplace_backward=inplace)

    compiled = torch.compile(step, fullgraph=True)
    x = logits.float().requires_grad_()
    loss = compiled(x, labels, weights)
    loss.backward()
    assert_fp32_close(loss, x.grad, ref_loss, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_errors(backend):
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="reduction"):
        masked_cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="disagree"):
        masked_cross_entropy(logits, torch.zeros(5, dtype=torch.long), backend=backend)
    with pytest.raises((ValueError, RuntimeError, IndexError), match="outside the vocabulary|out of bounds"):
        masked_cross_entropy(logits, torch.tensor([1, 2, 10, -100]), backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_second_backward_is_refused(backend):
    x = torch.randn(4, 30, requires_grad=True)
    loss = masked_cross_entropy(x, torch.tensor([1, 2, 3, -100]), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


def make_weights(n, seed=0):
    """fp32 per-row weights in [0, 2), one of them exactly 0."""
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 2
    w[n // 2] = 0.0
    return w


def test_weighted_reference_is_the_weighted_sum():
    logits, labels = make_inputs(30, 200)
    w = make_weights(30)
    rows = F.cross_entropy(logits, labels, reduction="none") * w.double()
    valid = labels != -100
    loss = masked_cross_entropy_ref(logits, labels, weights=w, reduction="sum", num_items=7)
    torch.testing.assert_close(loss, rows.sum() / 7, rtol=1e-7, atol=0)  # 1/num_items is an fp32 scale
    mean = masked_cross_entropy_ref(logits, labels, weights=w)  # weighted mean: / the label rows' weight sum
    torch.testing.assert_close(mean, rows.sum() / w.double()[valid].sum(), rtol=1e-12, atol=0)
    none = masked_cross_entropy_ref(logits, labels, weights=w, reduction="none", num_items=2)
    torch.testing.assert_close(none, rows / 2, rtol=1e-7, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weighted_fp32_matches_float64_reference(backend, option, reduction):
    logits, labels = make_inputs(37, 1000)
    kw = dict(OPTIONS[option], reduction=reduction, weights=make_weights(37))
    if reduction == "sum":
        kw["num_items"] = torch.tensor(11)
    go = torch.randn(37) if reduction == "none" else torch.tensor(-1.5)
    expected = reference(logits, labels, go, **kw)
    for inplace in (False, True):
        got = run(backend, logits, labels, grad_output=go, inplace_backward=inplace, **kw)
        assert_fp32_close(*got, *expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_weights_equals_all_ones(backend, reduction):
    logits, labels = make_inputs(19, 700)
    kw = dict(reduction=reduction, z_loss=1e-3, label_smoothing=0.1)
    go = torch.randn(19) if reduction == "none" else None
    loss, grad = run(backend, logits, labels, grad_output=go, **kw)
    ones_loss, ones_grad = run(backend, logits, labels, grad_output=go, weights=torch.ones(19), **kw)
    assert torch.equal(loss, ones_loss) and torch.equal(grad, ones_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_bf16_and_batched(backend):
    logits, labels = make_inputs(24, 900)
    w = make_weights(24, seed=1)
    ref_loss, ref_grad = reference(logits, labels, weights=w, softcap=5.0)
    x = logits.bfloat16().view(4, 6, 900).requires_grad_()
    loss = masked_cross_entropy(x, labels.view(4, 6), weights=w.view(4, 6).double(), softcap=5.0,
                                backend=backend)
    loss.backward()
    assert (loss.double() - ref_loss).abs() <= 1e-2 * ref_loss.abs() + 1e-3
    assert (x.grad.view(24, 900).double() - ref_grad).abs().max() <= 1e-2 * ref_grad.abs().max()
    with pytest.raises(ValueError, match="one weight per label"):
        masked_cross_entropy(logits, labels, weights=w[:5], backend=backend)
