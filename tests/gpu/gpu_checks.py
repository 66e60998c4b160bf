"""Shared pieces of the GPU suite: the project's tolerances against the float64 reference.

fp32: values within rtol 1e-5 and gradients within rtol 1e-4 (atol rtol x 1e-2 x max|ref|);
bf16/fp16: the kernel's error no worse than PyTorch's own error at that dtype + 1e-2.
"""

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_matches(out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, rtol: float,
                   dtype: torch.dtype) -> None:
    """`out` (the kernel, from `dtype` inputs) against `ref64`; `torch_out` is PyTorch eager on the
    same inputs (its error sets the bar below fp32)."""
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        torch.testing.assert_close(out.double(), ref64, rtol=rtol, atol=rtol * scale * 1e-2)
        return
    err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    assert err <= torch_err + 1e-2, f"{out.dtype}: kernel error {err:.3g} vs PyTorch's {torch_err:.3g}"


def labels_for(n: int, v: int, device: str = "cuda", ignored: float = 0.3) -> torch.Tensor:
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < ignored] = -100
    return labels
