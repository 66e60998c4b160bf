"""`packtune bench t5-attention`'s CPU contenders compute the same output gradients (a tiny row)."""

import torch

from packtune.bench import t5_attention


def test_bench_contenders_compute_the_same_gradients(monkeypatch):
    monkeypatch.setitem(t5_attention.ROWS, "inputs", [5, 1, 9, 4, 4])
    monkeypatch.setitem(t5_attention.ROWS, "targets", [3, 7, 1, 6])
    for row in ("inputs", "targets"):
        grads = {}
        for impl in ("segments", "buckets"):
            torch.manual_seed(0)
            step = t5_attention.make_step(impl, {"row": row, "heads": 2, "head_dim": 8}, "float32", "cpu")
            step()  # twice: a step clears the previous gradients
            grads[impl] = [t.grad for t in step.inputs]
        for ours, ref in zip(grads["buckets"], grads["segments"], strict=True):
            assert ours.abs().sum() > 0
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
