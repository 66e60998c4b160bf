"""Linear CE's chunking per device, and its fp32 dW accumulation without a [V, H] temporary in
the input dtype (CPU: slabs of the vocabulary; CUDA: cuBLAS addmm with an fp32 output, in
tests/gpu)."""

import importlib

import torch

lce = importlib.import_module("packtune.kernels.linear_cross_entropy")


def test_gpu_chunks_are_large_powers_of_two_within_the_logits_budget():
    assert lce.default_chunk_size(8192, 4096, 128256, "cuda", 2) == 4096  # Llama-3-8B, bf16: 1 GiB
    assert lce.default_chunk_size(8192, 4096, 128256, "cuda", 4) == 2048
    assert lce.default_chunk_size(8192, 4096, 256000, "cuda", 2) == 2048
    assert lce.default_chunk_size(8192, 4096, 2_000_000, "cuda", 2) == 1024  # floor: matmuls stay large
    assert lce.default_chunk_size(8192, 2048, 32000, "cuda", 2) == 4096  # ceiling
    assert lce.default_chunk_size(8192, 4096, 128256, "cpu") == 262  # the CPU rule: logits ~ hidden


def test_cpu_dw_accumulates_in_fp32_slab_by_slab(monkeypatch):
    monkeypatch.setattr(lce, "DW_SLAB_ROWS", 7)
    dlogits = torch.randn(5, 30, dtype=torch.bfloat16)
    h = torch.randn(5, 4, dtype=torch.bfloat16)
    grad_w = torch.full((30, 4), 0.5)
    lce._accumulate_grad_w(grad_w, dlogits, h)
    expected = 0.5 + (dlogits.t() @ h).float()
    torch.testing.assert_close(grad_w, expected)
    assert grad_w.dtype == torch.float32
