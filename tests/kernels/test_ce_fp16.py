"""fp16 gradients under loss scaling: the fused CE must not flush them to zero.

GradScaler multiplies the loss by S (2^16 by default), so the logits' true gradient is
S * (softmax - onehot) / N. The kernels write the gradient during the forward, before S is
known; had they written (softmax - onehot) / N there, every entry below fp16's smallest
subnormal (2^-24) would already be 0, and no later S could bring it back (at N = 512, V = 32000
that was most of the nonzero entries). fp16 therefore gets its 1/N in backward, together with S.
The reference: the float64 gradient of S * loss, rounded once to fp16 (what autocast-style fp32
CE hands back).
"""

import pytest
import torch

from packtune.kernels import linear_cross_entropy, masked_cross_entropy
from packtune.kernels.cross_entropy import masked_cross_entropy_ref

LOSS_SCALE = 2.0**16
NUM_ITEMS = 512


def _labels(n, v):
    labels = torch.randint(0, v, (n,))
    labels[::5] = -100
    return labels


def _check(grad, ref64):
    ref16 = ref64.half()
    nonzero = ref16 != 0
    lost = (nonzero & (grad == 0)).sum().item() / nonzero.sum().item()
    assert lost < 1e-3, f"{100 * lost:.1f}% of the representable gradient entries became 0"
    torch.testing.assert_close(grad.double(), ref64, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("inplace", [False, True])
def test_masked_ce_fp16_gradient_survives_loss_scaling(backend, inplace):
    logits64 = torch.randn(12, 32000, dtype=torch.float64)
    labels = _labels(12, 32000)
    x = logits64.half().requires_grad_()
    loss = masked_cross_entropy(x, labels, num_items=NUM_ITEMS, backend=backend, inplace_backward=inplace)
    (loss * LOSS_SCALE).backward()
    x64 = logits64.half().double().requires_grad_()
    (masked_cross_entropy_ref(x64, labels, num_items=NUM_ITEMS) * LOSS_SCALE).backward()
    ref_loss = masked_cross_entropy_ref(x64.detach(), labels, num_items=NUM_ITEMS)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-3, atol=1e-4)
    _check(x.grad, x64.grad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("weighted", [False, True])
def test_masked_ce_fp16_loses_no_more_entries_than_fp32_then_cast(backend, weighted):
    """Wide logits (std 4) put many softmax entries far below fp16's subnormal floor before the loss
    scale: the Triton kernel wrote them unscaled in the forward and lost 5x the entries that the fp32
    gradient rounded once to fp16 loses. (The C++ op takes fp32/bf16 only: fp16 on the "cpu" backend
    runs the torch reference, which is fp32-then-cast.)"""
    n, v = 256, 32000
    gen = torch.Generator().manual_seed(0)
    x16 = (torch.randn(n, v, generator=gen) * 4).half()
    labels = _labels(n, v)
    weights = torch.rand(n, generator=gen) * 3 if weighted else None
    x = x16.clone().requires_grad_()
    loss = masked_cross_entropy(x, labels, weights=weights, backend=backend, inplace_backward=True)
    (loss * LOSS_SCALE).backward()
    x32 = x16.float().requires_grad_()
    (masked_cross_entropy_ref(x32, labels, weights=weights) * LOSS_SCALE).backward()
    x64 = x16.double().requires_grad_()
    (masked_cross_entropy_ref(x64, labels, weights=weights) * LOSS_SCALE).backward()
    kept = x64.grad != 0
    lost, lost_fp32_cast = ((kept & (g == 0)).sum().item() for g in (x.grad, x32.grad.half()))
    assert lost_fp32_cast > 0 and lost <= lost_fp32_cast, (lost, lost_fp32_cast, kept.sum().item())
    assert not x.grad.isinf().any()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_ce_fp16_gradient_survives_loss_scaling(backend, reduction):
    n, h, v = 12, 16, 32000
    hidden64 = torch.randn(n, h, dtype=torch.float64)
    weight64 = torch.randn(v, h, dtype=torch.float64) / h**0.5
    labels = _labels(n, v)
    hidden, weight = (t.half().requires_grad_() for t in (hidden64, weight64))
    loss = linear_cross_entropy(hidden, weight, labels, num_items=NUM_ITEMS, reduction=reduction,
                                backend=backend, chunk_size=8)
    (loss.sum() * LOSS_SCALE).backward()
    h64, w64 = (t.half().double().requires_grad_() for t in (hidden64, weight64))
    ref = masked_cross_entropy_ref(h64 @ w64.t(), labels, num_items=NUM_ITEMS, reduction=reduction)
    (ref.sum() * LOSS_SCALE).backward()
    for grad, ref_grad in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        atol = 2e-2 * ref_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=atol)
