"""The C++ kernels under torch.compile(fullgraph=True): fake-tensor shapes registered, no graph break."""

import pytest
import torch

from packtune.kernels import _dispatch, rms_norm, rope_cos_sin, rotary, swiglu


@pytest.mark.skipif(_dispatch.cpu_extension() is None, reason="packtune._C not built")
def test_cpu_ops_compile_without_graph_breaks():
    x = torch.randn(6, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    g = torch.randn(6, 64, requires_grad=True)
    q, k = torch.randn(6, 2, 64, requires_grad=True), torch.randn(6, 1, 64, requires_grad=True)
    cos, sin = rope_cos_sin(1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64), 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)

    def block(x, w, g, q, k):
        qo, ko = rotary(q, k, cos, sin, cu_seqlens=cu, backend="cpu")
        return (swiglu(g, rms_norm(x, w, backend="cpu"), backend="cpu").sum() + qo.pow(2).sum()
                + ko.sum())

    inputs = (x, w, g, q, k)
    torch.compile(block, fullgraph=True)(*inputs).backward()
    compiled = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    block(*inputs).backward()
    for got, eager in zip(compiled, (t.grad for t in inputs), strict=True):
        torch.testing.assert_close(got, eager)
