"""logprobs (label log-probs from logits) on every backend against the float64 reference (log_softmax,
gather, segment sum): values and the logits' gradient for per-segment gradients of both signs, with
and without the gradient written over the logits."""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_fp32_close
from test_linear_logprobs import make_inputs, segments

from packtune.kernels import _dispatch, linear_logprobs, logprobs, logprobs_ref

BACKENDS = [b for b in ("triton", "cpu", "torch") if _dispatch.backend_runs_on(b, torch.device("cpu"))]
INPLACE_BACKENDS = [b for b in BACKENDS if b != "torch"]  # the torch reference has no in-place path
VARIANTS = [(b, False) for b in BACKENDS] + [(b, True) for b in INPLACE_BACKENDS]


def make_logits(n=37, v=999, ignored=0.3, seed=0):
    hidden, weight, labels = make_inputs(n, 24, v, ignored, seed)
    return hidden @ weight.T, labels


def grads_of(logits, dtype, grad_out, fn=logprobs, **kw):
    x = logits.to(dtype).clone().requires_grad_()
    out = fn(x * 1 if kw.get("inplace_backward") else x, **kw)  # in place: a non-leaf, as lm_head's output
    out.backward(grad_out.to(out.dtype))
    return out, x.grad


@pytest.mark.parametrize(("backend", "inplace"), VARIANTS)
@pytest.mark.parametrize("softcap", [None, 8.0])
@pytest.mark.parametrize("kind", ["one", "many", "per_row"])
def test_segment_sums_fp32_match_float64_reference(backend, inplace, softcap, kind):
    logits, labels = make_logits()
    ids, s, labels = segments(kind, labels)
    upstream = torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # both signs
    kw = dict(labels=labels, segment_ids=ids, num_segments=s, softcap=softcap)
    expected = grads_of(logits, torch.float64, upstream, fn=logprobs_ref, **kw)
    got = grads_of(logits, torch.float32, upstream, backend=backend, inplace_backward=inplace, **kw)
    assert got[0].shape == (s,) and got[0].dtype == torch.float32
    assert_fp32_close(got[0], expected[0], 1e-5)
    assert_fp32_close(got[1], expected[1], 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_matches_reference_and_counts(backend):
    logits, labels = make_logits(3 * 13, v=1001)
    logits, labels = logits.view(3, 13, -1), labels.view(3, 13)
    upstream = torch.randn(3, 13, dtype=torch.float64)
    expected = grads_of(logits, torch.float64, upstream, fn=logprobs_ref, labels=labels)
    got = grads_of(logits, torch.float32, upstream, labels=labels, backend=backend)
    unlabelled = got[0][labels == -100]
    assert got[0].shape == (3, 13) and unlabelled.numel() > 0 and torch.equal(unlabelled, 0 * unlabelled)
    assert_fp32_close(got[0], expected[0], 1e-5)
    assert_fp32_close(got[1], expected[1], 1e-4)
    ids, s, labels = segments("many", labels.reshape(-1))
    flat = logits.float().reshape(-1, 1001)
    sums, counts = logprobs(flat, labels, ids, s, return_counts=True, backend=backend)
    ref_sums, ref_counts = logprobs_ref(logits.reshape(-1, 1001), labels, ids, s, return_counts=True)
    assert counts.dtype == torch.int64 and torch.equal(counts, ref_counts)
    assert_fp32_close(sums, ref_sums, 1e-5)


@pytest.mark.parametrize(("backend", "inplace"), VARIANTS)
def test_bf16_no_worse_than_eager_bf16(backend, inplace):
    """bf16 logits: no further from float64 than TRL's eager path (upcast to fp32, log_softmax, gather)."""
    logits, labels = make_logits(40, 2000)
    ids, s, labels = segments("many", labels)
    upstream = torch.randn(s, dtype=torch.float64)
    kw = dict(labels=labels, segment_ids=ids, num_segments=s, softcap=30.0)
    refs = grads_of(logits, torch.float64, upstream, fn=logprobs_ref, **kw)
    eager = grads_of(logits, torch.bfloat16, upstream, fn=logprobs_ref, **kw)
    got = grads_of(logits, torch.bfloat16, upstream, backend=backend, inplace_backward=inplace, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for out, e, r in zip(got, eager, refs, strict=True):
        assert (out.double() - r).abs().max() <= (e.double() - r).abs().max() + 1e-2


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_gradient_is_written_over_the_logits(backend):
    """With a frozen lm_head the logits' gradient flows on to the hidden states; in place it is the logits'
    own storage (no [N x V] buffer), and equal to the out-of-place gradient."""
    hidden, weight, labels = make_inputs(30, 16, 500)
    ids, s, labels = segments("many", labels)
    upstream = torch.randn(s, dtype=torch.float64)
    results, same_storage = {}, {}
    for inplace in (False, True):
        h = hidden.float().clone().requires_grad_()
        logits = F.linear(h, weight.float())

        def check_storage(grad, logits=logits, inplace=inplace):
            same_storage[inplace] = grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()

        logits.register_hook(check_storage)
        out = logprobs(logits, labels, ids, s, backend=backend, inplace_backward=inplace)
        out.backward(upstream.float())
        results[inplace] = (out, h.grad)
    assert same_storage == {False: False, True: True}
    for got, want in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    expected = linear_logprobs(hidden.float(), weight.float(), labels, ids, s, backend=backend)
    torch.testing.assert_close(results[True][0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_refused_when_another_op_needs_the_logits(backend):
    """exp saves its output for backward: overwriting it would give wrong gradients, so autograd refuses."""
    x = torch.randn(6, 50, requires_grad=True)
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    out = logprobs(x.exp(), labels, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_bad_segments_are_refused():
    logits, labels = make_logits(8, 50, ignored=0.0)
    with pytest.raises(ValueError, match="need segment_ids"):
        logprobs(logits, labels, num_segments=2)
    with pytest.raises(ValueError, match="segment id 2 at row 7"):
        logprobs(logits, labels, torch.tensor([0] * 7 + [2]), 2)


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_on_a_sliced_view(backend):
    """TRL slices the logits (`logits[:, :-1]`): a view the op cannot flatten without a copy. In place
    then writes the copy, the gradient is still right, and the logits are left as they were, so a
    backward that needs them (exp's, which saved its output) still runs."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 300, requires_grad=True)
    labels = torch.randint(0, 300, (2, 8))
    labels[0, :3] = -100
    results = []
    for inplace in (False, True):
        z = (x * 0.5).exp()  # a non-leaf whose values exp's backward needs
        before = z.detach().clone()
        out = logprobs(z[:, :-1], labels, backend=backend, inplace_backward=inplace)
        weights = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
        out.backward(weights)
        assert torch.equal(z.detach(), before), "a copy was written, not the logits"
        results.append((out.detach(), x.grad.clone()))
        x.grad = None
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    expected = logprobs_ref((x * 0.5).exp().detach().double()[:, :-1], labels)
    torch.testing.assert_close(results[1][0].double(), expected, rtol=1e-5, atol=1e-6)
