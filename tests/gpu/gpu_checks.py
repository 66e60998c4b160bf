"""Shared pieces of the GPU suite: the project's tolerances against the float64 reference.

fp32: values within rtol 1e-5 and gradients within rtol 1e-4 (atol rtol x 1e-2 x max|ref|);
bf16/fp16: the kernel's error no worse than PyTorch's own error at that dtype + 1e-2.
gpu-check's quick pass (GPU_CHECK_QUICK=1) checks bf16 only, a third of the Triton compiles; its
`-m "gpu and not slow"` also leaves out the shapes past 2^31 elements (marked slow).
"""

import os

import torch

QUICK = os.environ.get("GPU_CHECK_QUICK") == "1"
DTYPES = [torch.bfloat16] if QUICK else [torch.float32, torch.bfloat16, torch.float16]


def assert_matches(out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, rtol: float,
                   dtype: torch.dtype, sum_terms: int = 0) -> None:
    """`out` (the kernel, from `dtype` inputs) against `ref64`; `torch_out` is PyTorch eager on the
    same inputs (its error sets the bar below fp32). `sum_terms`: the longest sum behind an entry
    (a GEMM's K); fp32 then also allows K roundings (2^-24 each) of the largest entry, the worst
    case of a K-term sum in any order (cuBLAS's fp32 GEMMs miss 1e-7 of it at K in the thousands)."""
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        atol = max(rtol * scale * 1e-2, sum_terms * 2**-24 * scale)
        torch.testing.assert_close(out.double(), ref64, rtol=rtol, atol=atol)
        return
    err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    assert err <= torch_err + 1e-2, f"{out.dtype}: kernel error {err:.3g} vs PyTorch's {torch_err:.3g}"


def labels_for(n: int, v: int, device: str = "cuda", ignored: float = 0.3) -> torch.Tensor:
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < ignored] = -100
    return labels
