"""Shared pieces of the kernel tests: the backends to force, and the tolerances docs/kernels.md states."""

import pytest
import torch

from packtune.kernels import _dispatch

# The fused backends checked against the reference: Triton (interpreted without a GPU) and C++.
FUSED = [
    "triton",
    pytest.param("cpu", marks=pytest.mark.skipif(_dispatch.cpu_extension() is None,
                                                 reason="packtune._C not built")),
]


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def assert_fp32_close(out: torch.Tensor, ref64: torch.Tensor, rtol: float) -> None:
    """fp32 against the float64 reference: relative `rtol` (1e-5 values, 1e-4 gradients)."""
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref64, rtol=rtol, atol=rtol * ref64.abs().max().item() * 1e-2)


def assert_low_precision_close(out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor,
                               backend: str = "", chained_stores: int = 1) -> None:
    """bf16/fp16: the kernel's error is no worse than PyTorch's own error at that dtype + 1e-2.

    Known interpreter gap: Triton's interpreter truncates fp32 -> bf16 stores (a GPU rounds to
    nearest even, `cvt.rn`), so interpreted bf16 outputs, and outputs computed from interpreted
    bf16 intermediates (an fp32 gradient from a bf16 tensor a kernel stored: PyTorch's result is
    then bf16), get one more bf16 ulp of slack per interpreted store on the way (`chained_stores`:
    the LoRA MLP stores g and u, then h, before its output).
    """
    err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    slack = 1e-2
    bf16 = torch.bfloat16 in (out.dtype, torch_out.dtype)
    if backend == "triton" and bf16 and _dispatch.triton_interpreted():
        slack += chained_stores * ref64.abs().max().item() * 2**-7
    assert err <= torch_err + slack, f"kernel error {err:.3g} vs PyTorch's {torch_err:.3g}"
