"""linear_logprobs on every backend against the float64 reference (materialised logits, log_softmax,
gather, segment sum): values, dHidden and dW for per-segment gradients of both signs.

The chunk matmuls are torch matmuls and only the CE row kernel is Triton (no tl.dot), so the
interpreter's bf16 tl.dot gap does not apply: bf16 is checked on every backend too.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_fp32_close
from torch.utils._python_dispatch import TorchDispatchMode

from packtune.kernels import PackedLayout, _dispatch, layout_segments, linear_logprobs, linear_logprobs_ref

BACKENDS = [b for b in ("triton", "cpu", "torch") if _dispatch.backend_runs_on(b, torch.device("cpu"))]
N, H, V = 37, 24, 999


def make_inputs(n=N, h=H, v=V, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g) / h**0.5 * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    return hidden, weight, labels


def segments(kind, labels):
    """(segment_ids, S, labels): one segment; many, some empty (1, 4, 7, 8, 10: no rows; 3: one
    unlabelled row, whose id -1 is never read); or one segment per row."""
    n = labels.numel()
    if kind == "one":
        return torch.zeros(n, dtype=torch.int64), 1, labels
    if kind == "per_row":
        return torch.arange(n), n, labels
    ids = torch.tensor(np.resize(np.repeat([0, 2, 3, 5, 6, 9], [7, 5, 1, 11, 6, 7]), n))
    labels = torch.where(ids == 3, -100, labels)
    return torch.where(ids == 3, -1, ids), 11, labels


def grads_of(fn, hidden, weight, dtype, grad_out, **kw):
    h, w = (t.to(dtype).clone().requires_grad_() for t in (hidden, weight))
    out = fn(h, w, **kw)
    out.backward(grad_out.to(out.dtype))
    return out, h.grad, w.grad


def assert_matches_reference(got, expected):
    for out, ref, rtol in zip(got, expected, (1e-5, 1e-4, 1e-4), strict=True):
        assert_fp32_close(out, ref, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 8.0])
@pytest.mark.parametrize("kind", ["one", "many", "per_row"])
def test_segment_sums_fp32_match_float64_reference(backend, softcap, kind):
    hidden, weight, labels = make_inputs()
    ids, s, labels = segments(kind, labels)
    upstream = torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # both signs
    kw = dict(labels=labels, segment_ids=ids, num_segments=s, softcap=softcap)
    expected = grads_of(linear_logprobs_ref, hidden, weight, torch.float64, upstream, **kw)
    kw.update(backend=backend, chunk_size=8)
    got = grads_of(linear_logprobs, hidden, weight, torch.float32, upstream, **kw)
    assert got[0].shape == (s,)
    assert_matches_reference(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 8.0])
def test_per_token_fp32_matches_float64_reference(backend, softcap):
    hidden, weight, labels = make_inputs(3 * 13, v=1001)
    labels = labels.view(3, 13)
    upstream = torch.randn(3, 13, dtype=torch.float64)
    kw = dict(labels=labels, softcap=softcap)
    expected = grads_of(linear_logprobs_ref, hidden.view(3, 13, H), weight, torch.float64, upstream, **kw)
    got = grads_of(linear_logprobs, hidden.view(3, 13, H), weight, torch.float32, upstream, backend=backend,
                   chunk_size=16, **kw)
    unlabelled = got[0][labels == -100]
    assert got[0].shape == (3, 13) and unlabelled.numel() > 0 and torch.equal(unlabelled, 0 * unlabelled)
    assert_matches_reference(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_no_worse_than_torch_bf16(backend, softcap):
    hidden, weight, labels = make_inputs(40, 32, 2000)
    ids, s, labels = segments("many", labels)
    upstream = torch.randn(s, dtype=torch.float64)
    kw = dict(labels=labels, segment_ids=ids, num_segments=s, softcap=softcap)
    refs = grads_of(linear_logprobs_ref, hidden, weight, torch.float64, upstream, **kw)
    eager = grads_of(linear_logprobs_ref, hidden, weight, torch.bfloat16, upstream, **kw)  # upcast logits
    kw.update(backend=backend, chunk_size=16)
    got = grads_of(linear_logprobs, hidden, weight, torch.bfloat16, upstream, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    for out, e, r in zip(got, eager, refs, strict=True):
        assert (out.double() - r).abs().max() <= (e.double() - r).abs().max() + 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_and_unlabelled_rows(backend):
    hidden, weight, labels = make_inputs()
    ids, s, labels = segments("many", labels)
    poisoned = hidden.float().clone()
    poisoned[labels == -100] = float("nan")  # never read: unlabelled rows skip the matmuls
    sums, counts = linear_logprobs(poisoned, weight.float(), labels, ids, s, return_counts=True,
                                   backend=backend)
    ref_sums, ref_counts = linear_logprobs_ref(hidden, weight, labels, ids, s, return_counts=True)
    assert counts.dtype == torch.int64 and torch.equal(counts, ref_counts)
    assert torch.equal(counts[[1, 3, 4, 7, 8, 10]], torch.zeros(6, dtype=torch.int64))
    assert_fp32_close(sums, ref_sums, 1e-5)
    assert torch.equal(sums[counts == 0], torch.zeros(int((counts == 0).sum())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_label_rows_give_zeros(backend):
    hidden, weight, labels = make_inputs(10, 8, 300)
    labels = torch.full_like(labels, -100)
    out, dh, dw = grads_of(linear_logprobs, hidden, weight, torch.float32, torch.ones(3), labels=labels,
                           segment_ids=torch.arange(10) % 3, num_segments=3, backend=backend)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in (out, dh, dw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_label_rows_and_segments(backend):
    """Packed: the layout's label rows and samples as segments give what explicit ids give; padded
    rows are one segment each."""
    hidden, weight, labels = make_inputs()
    lens = [7, 5, 1, 11, 6, 7]
    layout = PackedLayout.packed(lens, labels)
    ids, s = layout_segments(layout)
    assert s == 6 and torch.equal(ids, torch.tensor(np.repeat(np.arange(6), lens)))
    upstream = torch.randn(s)
    kw = dict(labels=labels, segment_ids=ids, num_segments=s, backend=backend, chunk_size=8)
    with_layout = grads_of(linear_logprobs, hidden, weight, torch.float32, upstream, layout=layout, **kw)
    without = grads_of(linear_logprobs, hidden, weight, torch.float32, upstream, **kw)
    assert all(torch.equal(a, b) for a, b in zip(with_layout, without, strict=True))
    padded_ids, rows = layout_segments(PackedLayout.padded([3, 5], width=5))
    assert rows == 2 and padded_ids.tolist() == [0] * 5 + [1] * 5


class MatmulCount(TorchDispatchMode):
    """Counts the matrix products dispatched while active."""

    PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.PRODUCTS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frozen_lm_head_forms_dhidden_in_the_forward(backend, dtype):
    """A frozen lm_head (LoRA, QLoRA): the forward forms each row's dHidden / g, backward only scales
    it, running no matrix product; dHidden as the float64 reference (fp32) or no worse than eager's at
    the dtype, and as the unfrozen op's to an ulp; a second backward is refused."""
    hidden, weight, labels = make_inputs(40, 32, 2000)
    ids, s, labels = segments("many", labels)
    upstream = torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = dict(labels=labels, segment_ids=ids, num_segments=s, softcap=30.0)

    def frozen(fn, dt, **extra):
        h = hidden.to(dt).clone().requires_grad_()
        out = fn(h, weight.to(dt), **kw, **extra)
        with MatmulCount() as products:
            out.backward(upstream.to(out.dtype), retain_graph=True)
        return out, h, products.count

    out, h, products = frozen(linear_logprobs, dtype, backend=backend, chunk_size=8)
    assert products == 0
    ref_out, ref_h, _ = frozen(linear_logprobs_ref, torch.float64)
    unfrozen = grads_of(linear_logprobs, hidden, weight, dtype, upstream, backend=backend, chunk_size=8, **kw)
    if dtype == torch.float32:
        assert_fp32_close(out, ref_out, 1e-5)
        assert_fp32_close(h.grad, ref_h.grad, 1e-4)
        torch.testing.assert_close(h.grad, unfrozen[1], rtol=1e-5, atol=1e-6)
    else:
        _, eager_h, _ = frozen(linear_logprobs_ref, dtype)
        error, eager_error = ((g.grad.double() - ref_h.grad).abs().max() for g in (h, eager_h))
        assert error <= eager_error + 1e-2
        # one more rounding than the unfrozen op's (the unscaled gradient, stored at the dtype): within
        # an ulp of the largest element
        ulp = 2**-7 * unfrozen[1].abs().max().item()
        torch.testing.assert_close(h.grad, unfrozen[1], rtol=2**-7, atol=ulp)
    with pytest.raises(RuntimeError, match="ran twice"):
        out.backward(upstream.to(out.dtype))


def test_dpo_loss_gradients_match_reference():
    """A DPO step on two pairs (segments chosen_0, rejected_0, chosen_1, rejected_1): the loss gives
    opposite-sign gradients to chosen and rejected; values and gradients as the float64 reference."""
    hidden, weight, labels = make_inputs(40, 16, 500)
    ids = torch.arange(40) // 10
    ref_logp = torch.tensor([-60.0, -58.0, -61.0, -59.5], dtype=torch.float64)

    def dpo(logp_fn, dtype):
        h, w = (t.to(dtype).clone().requires_grad_() for t in (hidden, weight))
        ratios = logp_fn(h, w, labels, ids, 4) - ref_logp.to(dtype)
        loss = -F.logsigmoid(0.1 * (ratios[0::2] - ratios[1::2])).mean()
        loss.backward()
        return loss, h.grad, w.grad

    assert_matches_reference(dpo(linear_logprobs, torch.float32), dpo(linear_logprobs_ref, torch.float64))


def test_bad_input_errors():
    hidden, weight, labels = make_inputs(6, 8, 50)
    labels[:] = torch.tensor([3, -100, 4, 5, -100, 6])
    ids = torch.tensor([0, 9, 0, 1, -1, 1])  # unlabelled rows' ids are not read
    assert linear_logprobs(hidden, weight, labels, ids, 2).shape == (2,)
    with pytest.raises(ValueError, match=r"segment id 2 at row 3 \(a label row\) is outside \[0, 2\)"):
        linear_logprobs(hidden, weight, labels, torch.tensor([0, 0, 0, 2, 0, 1]), 2)
    with pytest.raises(ValueError, match="need segment_ids"):
        linear_logprobs(hidden, weight, labels, num_segments=2)
    with pytest.raises(ValueError, match="positive int"):
        linear_logprobs(hidden, weight, labels, ids, torch.tensor(2))
    with pytest.raises(TypeError, match="integer tensor"):
        linear_logprobs(hidden, weight, labels, ids.float(), 2)
    with pytest.raises(ValueError, match="one segment id per row"):
        linear_logprobs(hidden, weight, labels, ids[:5], 2)
    with pytest.raises(ValueError, match="disagree"):
        linear_logprobs(hidden, weight[:, :4], labels)
