"""`packtune bench layernorm`: is torch's own LayerNorm (BLOOM's norm) as fast as a fused one?

Forward+backward of a LayerNorm with weight and bias. `torch`: `F.layer_norm` eager (ATen's own
kernel; what packtune's BLOOM uses, the baseline); `compile`: LayerNorm written out (mean,
variance, normalise, scale, shift) under torch.compile, which Inductor fuses into generated
kernels; `rmsnorm`: packtune's fused RMSNorm on the same shape (C++ on CPU, Triton on CUDA): a norm
kernel of packtune's kind doing less work (no mean, no bias), so a floor for a hand-written
LayerNorm kernel in the same style.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packtune.bench import harness
from packtune.bench.ops import fwd_bwd_step
from packtune.kernels.rms_norm import rms_norm

IMPLS = ("torch", "compile", "rmsnorm")
EPS = 1e-5


def layer_norm_composed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics, as ATen's
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    return ((xf - mean) * torch.rsqrt(var + EPS) * w + b).to(x.dtype)


def make_step(impl: str, shape: dict, dtype: str, device: str):
    dt = getattr(torch, dtype)
    x = torch.randn(shape["T"], shape["hidden"], device=device, dtype=dt, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape["hidden"], device=device, dtype=dt)).requires_grad_()
    b = (0.1 * torch.randn(shape["hidden"], device=device, dtype=dt)).requires_grad_()
    dy = torch.randn_like(x)
    if impl == "torch":
        return fwd_bwd_step(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS), [x, w, b], [dy])
    if impl == "compile":
        return fwd_bwd_step(torch.compile(layer_norm_composed, dynamic=False), [x, w, b], [dy])
    if impl == "rmsnorm":
        return fwd_bwd_step(lambda x, w: rms_norm(x, w, EPS), [x, w], [dy])
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("layernorm", __doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args(argv)
    shapes = [{"T": args.tokens, "hidden": args.hidden}]
    harness.run_table("layernorm", "packtune.bench.layernorm:make_step", IMPLS, shapes, "torch", args)
