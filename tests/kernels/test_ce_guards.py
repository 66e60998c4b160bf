"""What the fused CE ops refuse: labels outside the vocabulary, and a backward that would read
logits the in-place CE has overwritten. Every backend refuses, none gives wrong gradients.

The triton backend runs through the interpreter here (TRITON_INTERPRET=1); on the GPU the label
check is a device-side assert (`assert_labels_in_range`, no host sync), checked below on CPU
tensors, where torch._assert_async raises at once.
"""

import pytest
import torch

from packtune.kernels import _dispatch, linear_cross_entropy, masked_cross_entropy
from packtune.kernels.loss_inputs import assert_labels_in_range

BACKENDS = [b for b in ("triton", "cpu", "torch") if _dispatch.backend_runs_on(b, torch.device("cpu"))]
V = 40


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [V, V + 1000, -1, -7])
def test_masked_ce_rejects_labels_outside_the_vocabulary(backend, bad):
    logits = torch.randn(6, V, requires_grad=True)
    labels = torch.tensor([1, -100, bad, 3, 0, V - 1])
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        masked_cross_entropy(logits, labels, backend=backend).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [V, -1])
def test_linear_ce_rejects_labels_outside_the_vocabulary(backend, bad):
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(V, 8, requires_grad=True)
    labels = torch.tensor([1, -100, bad, 3, 0, V - 1])
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        linear_cross_entropy(hidden, weight, labels, backend=backend, chunk_size=4).backward()


def test_device_side_label_check():
    ok = torch.tensor([0, -100, V - 1, 5])
    assert_labels_in_range(ok, -100, V)
    for bad in (V, -1):
        with pytest.raises(RuntimeError):
            assert_labels_in_range(torch.tensor([0, bad, -100]), -100, V)
    assert_labels_in_range(torch.tensor([0, -1]), -1, V)  # the ignore_index itself is fine


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_inplace_ce_over_logits_autograd_still_needs_raises(backend):
    """`z.exp()` saves its output for backward; the in-place CE overwrites it with the gradient,
    so exp's backward would read the gradient as if it were exp(z). It must raise instead."""
    z = torch.randn(5, V, requires_grad=True)
    labels = torch.tensor([1, -100, 7, 3, 0])
    logits = z.exp()
    loss = masked_cross_entropy(logits, labels, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_ce_over_logits_nobody_saved_is_exact(backend):
    """The supported use: logits no other op saved (a matmul saves its inputs, not its output)."""
    h = torch.randn(5, 8, dtype=torch.float64)
    w = torch.randn(8, V, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 7, 3, 0])
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ w, labels), w)[0]
    loss = masked_cross_entropy((h @ w).float(), labels, backend=backend, inplace_backward=True)
    torch.testing.assert_close(torch.autograd.grad(loss, w)[0], ref, rtol=1e-4, atol=1e-6)
