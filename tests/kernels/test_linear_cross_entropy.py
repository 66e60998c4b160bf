"""linear_cross_entropy on every backend against the float64 reference (materialised logits).

The chunk matmuls are torch matmuls and only the row kernel is Triton (no tl.dot), so the
interpreter's bf16 tl.dot gap does not apply: bf16 is checked on every backend too.
"""

import pytest
import torch
import torch.nn.functional as F

from packtune.kernels import LinearCrossEntropy, _dispatch, linear_cross_entropy
from packtune.kernels.linear_cross_entropy import linear_cross_entropy_ref

BACKENDS = [b for b in ("triton", "cpu", "torch") if _dispatch.backend_runs_on(b, torch.device("cpu"))]


def make_inputs(n, h, v, ignored=0.3, bias=True):
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) / h**0.5 * 3
    b = torch.randn(v, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignored] = -100
    return hidden, weight, b, labels


def leaves(tensors, dtype):
    return [None if t is None else t.to(dtype).clone().requires_grad_() for t in tensors]


def run(fn, tensors, labels, dtype, grad_output=None, **kw):
    h, w, b = leaves(tensors, dtype)
    loss = fn(h, w, labels, bias=b, **kw)
    loss.backward(grad_output.to(loss.dtype) if grad_output is not None else torch.ones_like(loss))
    return loss, [t.grad for t in (h, w, b) if t is not None]


def assert_fp32_close(result, expected):
    (loss, grads), (ref_loss, ref_grads) = result, expected
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item() + 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_matches_float64_reference(backend, bias, reduction):
    tensors, labels = make_inputs(45, 24, 1000, bias=bias)[:3], make_inputs(45, 24, 1000)[3]
    go = torch.randn(45) if reduction == "none" else torch.tensor(0.7)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    expected = run(linear_cross_entropy_ref, tensors, labels, torch.float64, go, **kw)
    assert_fp32_close(run(linear_cross_entropy, tensors, labels, torch.float32, go, backend=backend,
                          chunk_size=8, **kw), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_per_row_losses_match_float64_reference(backend):
    """reduction="none" with a frozen weight and bias: dX is formed in the forward (see the module's
    docstring) and scaled per row in backward, with every option of the row kernel."""
    hidden, weight, bias, labels = make_inputs(45, 24, 1000)
    go = torch.randn(45, dtype=torch.float64)
    kw = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    got, expected, fused = [], [], dict(backend=backend, chunk_size=8)
    for fn, dtype, out, extra in ((linear_cross_entropy, torch.float32, got, fused),
                                  (linear_cross_entropy_ref, torch.float64, expected, {})):
        h = hidden.to(dtype).clone().requires_grad_()
        loss = fn(h, weight.to(dtype), labels, bias=bias.to(dtype), **kw, **extra)
        loss.backward(go.to(loss.dtype))
        out.extend((loss, [h.grad]))
    assert_fp32_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_torch_bf16(backend):
    *tensors, labels = make_inputs(40, 32, 2000)
    ref_loss, ref_grads = run(linear_cross_entropy_ref, tensors, labels, torch.float64)

    def torch_bf16(h, w, labels, bias):
        return F.cross_entropy(F.linear(h, w, bias).float(), labels)

    t_loss, t_grads = run(torch_bf16, tensors, labels, torch.bfloat16)
    loss, grads = run(linear_cross_entropy, tensors, labels, torch.bfloat16, backend=backend, chunk_size=16)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    assert (loss.double() - ref_loss).abs() <= (t_loss.double() - ref_loss).abs() + 1e-2
    for g, t, r in zip(grads, t_grads, ref_grads, strict=True):
        assert (g.double() - r).abs().max() <= (t.double() - r).abs().max() + 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_once(backend):
    tensors, labels = make_inputs(6, 16, 128256)[:3], torch.tensor([5, -100, 128255, 0, 77777, -100])
    expected = run(linear_cross_entropy_ref, tensors, labels, torch.float64)
    assert_fp32_close(run(linear_cross_entropy, tensors, labels, torch.float32, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grads(backend, reduction):
    *tensors, _ = make_inputs(10, 8, 300)
    labels = torch.full((10,), -100)
    loss, grads = run(linear_cross_entropy, tensors, labels, torch.float32, backend=backend,
                      reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_skip_the_matmul_and_num_items(backend):
    *tensors, labels = make_inputs(30, 16, 500)
    poisoned = tensors[0].clone()
    poisoned[labels == -100] = float("nan")  # never read if ignored rows skip the matmuls
    kw = dict(reduction="sum", num_items=torch.tensor(50))
    loss, grads = run(linear_cross_entropy, [poisoned, *tensors[1:]], labels, torch.float32,
                      grad_output=torch.tensor(-3.0), backend=backend, chunk_size=4, **kw)
    expected = run(linear_cross_entropy_ref, tensors, labels, torch.float64, torch.tensor(-3.0), **kw)
    expected[1][0][labels == -100] = 0.0
    assert_fp32_close((loss, grads), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_module_with_lm_head(backend):
    hidden, weight, bias, labels = make_inputs(3 * 20, 16, 700)
    lm_head = torch.nn.Linear(16, 700).double()
    with torch.no_grad():
        lm_head.weight.copy_(weight)
        lm_head.bias.copy_(bias)
    loss_fn = LinearCrossEntropy(backend=backend, chunk_size=8, z_loss=1e-4)
    grads = []
    for _ in range(2):
        lm_head.zero_grad()
        h = hidden.float().view(3, 20, 16).requires_grad_()
        loss_fn(h, lm_head.float(), labels.view(3, 20)).backward()
        grads.append((h.grad.view(60, 16).clone(), lm_head.weight.grad.clone(), lm_head.bias.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    loss = loss_fn(hidden.float(), weight.float(), labels, bias=bias.float())  # a weight tensor and a bias
    expected = run(linear_cross_entropy_ref, (hidden, weight, bias), labels, torch.float64, z_loss=1e-4)
    assert_fp32_close((loss, list(grads[0])), expected)


def test_fsdp2_sharded_lm_head(tmp_path):
    """A DTensor (FSDP2-sharded) lm_head weight is gathered explicitly; dW lands on the shards."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        hidden, weight, bias, labels = make_inputs(20, 16, 300)
        lm_head = torch.nn.Linear(16, 300)
        with torch.no_grad():
            lm_head.weight.copy_(weight)
            lm_head.bias.copy_(bias)
        fully_shard(lm_head)
        h = hidden.float().requires_grad_()
        loss = linear_cross_entropy(h, lm_head, labels)
        loss.backward()
        expected = run(linear_cross_entropy_ref, (hidden, weight, bias), labels, torch.float64)
        got = [h.grad, lm_head.weight.grad.full_tensor(), lm_head.bias.grad.full_tensor()]
        assert_fp32_close((loss, got), expected)
    finally:
        dist.destroy_process_group()


def test_bad_input_errors():
    hidden, weight, _, labels = make_inputs(4, 8, 50)
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight[:, :4], labels)
    with pytest.raises(TypeError, match="cast one"):
        linear_cross_entropy(hidden.float(), weight, labels)
    with pytest.raises(ValueError, match="one label per row"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(hidden, weight, labels, bias=torch.zeros(3, dtype=torch.float64))


def make_weights(n, seed=0):
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 2
    w[n // 3] = 0.0
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weighted_fp32_matches_float64_reference(backend, bias, reduction):
    *tensors, labels = make_inputs(45, 24, 1000, bias=bias)
    go = torch.randn(45) if reduction == "none" else torch.tensor(0.7)
    kw = dict(reduction=reduction, weights=make_weights(45), label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    if reduction == "sum":
        kw["num_items"] = torch.tensor(6)
    expected = run(linear_cross_entropy_ref, tensors, labels, torch.float64, go, **kw)
    assert_fp32_close(run(linear_cross_entropy, tensors, labels, torch.float32, go, backend=backend,
                          chunk_size=8, **kw), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_weights_equals_all_ones(backend):
    *tensors, labels = make_inputs(30, 16, 500)
    kw = dict(reduction="sum", num_items=torch.tensor(9), z_loss=1e-3)
    kw.update(backend=backend, chunk_size=8)
    loss, grads = run(linear_cross_entropy, tensors, labels, torch.float32, **kw)
    ones = run(linear_cross_entropy, tensors, labels, torch.float32, weights=torch.ones(30), **kw)
    assert torch.equal(loss, ones[0]) and all(torch.equal(a, b) for a, b in zip(grads, ones[1], strict=True))
