"""The Triton MoE expert block (kernels/moe_triton.py) compiled on the GPU at Qwen3-30B-A3B's and
gpt-oss-20b's layer shapes: bf16 values and every gradient against the float64 reference, with a
uniform and a collapsed router (most experts empty), and a forward+backward without a host sync.
Skipped without CUDA."""

import pytest
import torch

from packtune.kernels.moe import SWIGLU, gpt_oss_format, moe_experts, moe_experts_ref

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # slow: the full gpu-check pass only, not --quick
LAYERS = {  # format, hidden, intermediate, experts, top-k
    "qwen3-30b-a3b": (SWIGLU, 2048, 768, 128, 8),
    "gpt-oss-20b": (gpt_oss_format(), 2880, 2880, 32, 4),
}


def _layer(model: str, tokens: int, router: str):
    """float64 leaves on the GPU (x, routing weights, gate_up, down[, biases]), the indices, dy."""
    fmt, hidden, inter, experts, k = LAYERS[model]
    gate_up = (experts, hidden, 2 * inter) if fmt.transposed else (experts, 2 * inter, hidden)
    down = (experts, inter, hidden) if fmt.transposed else (experts, hidden, inter)
    scale = 4.0 if fmt.limit < float("inf") else 1.0  # gpt-oss: gate/up values past its clamp limit
    leaves = [torch.randn(tokens, hidden), None, torch.randn(gate_up) * scale / hidden**0.5,
              torch.randn(down) / inter**0.5]
    if fmt.transposed:
        leaves += [torch.randn(experts, 2 * inter), torch.randn(experts, hidden) * 0.1]
    logits = torch.randn(tokens, experts)
    if router == "collapsed":  # every token's choices among the first k + 1 experts
        logits[:, : k + 1] += 100.0
    weights, index = torch.topk(logits.softmax(-1), k)
    leaves[1] = weights / weights.sum(-1, keepdim=True)
    leaves = [t.to("cuda", torch.float64) for t in leaves]
    return fmt, leaves, index.cuda(), torch.randn(tokens, hidden, device="cuda", dtype=torch.float64)


def _run(fn, fmt, leaves, index, dy, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    x, weights, gate_up, down, *biases = leaves
    y = fn(x, index, weights, gate_up, down, *(biases or [None, None]), fmt)
    y.backward(dy.to(dtype))
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("router", ["uniform", "collapsed"])
@pytest.mark.parametrize("model", LAYERS)
def test_bf16_matches_float64_reference(model, router):
    fmt, leaves, index, dy = _layer(model, 1024, router)
    exact = _run(moe_experts_ref, fmt, leaves, index, dy, torch.float64)
    eager = _run(moe_experts_ref, fmt, leaves, index, dy, torch.bfloat16)
    got = _run(lambda *a: moe_experts(*a, backend="triton"), fmt, leaves, index, dy, torch.bfloat16)
    names = ["y", "dx", "d weights", "d gate_up", "d down", "d gate_up bias", "d down bias"]
    for name, out, torch_out, ref in zip(names, got, eager, exact, strict=False):
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), name
        # PyTorch's own bf16 error + 1e-2, and at least one bf16 rounding of the largest entry (the two
        # round intermediates at different steps; see tests/kernels/test_moe.py)
        err, torch_err = ((t.double() - ref).abs().max().item() for t in (out, torch_out))
        bar = torch_err + max(1e-2, ref.abs().max().item() * 2**-9)
        assert err <= bar, f"{model} {router} {name}: error {err:.3g} vs PyTorch's {torch_err:.3g}"


@pytest.mark.parametrize("model", LAYERS)
def test_forward_backward_without_host_sync(model):
    fmt, leaves, index, dy = _layer(model, 4096, "uniform")
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in leaves]
    x, weights, gate_up, down, *biases = leaves
    dy = dy.to(torch.bfloat16)
    moe_experts(x, index, weights, gate_up, down, *(biases or [None, None]), fmt).backward(dy)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_experts(x, index, weights, gate_up, down, *(biases or [None, None]), fmt).backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(t.grad).all() for t in leaves)
