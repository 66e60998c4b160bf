"""`packtune bench rmsnorm`: RMSNorm forward+backward, packtune vs torch eager vs torch.compile."""

from __future__ import annotations

import torch

from packtune.bench import harness
from packtune.bench.ops import IMPLS, fwd_bwd_step, pick
from packtune.kernels.rms_norm import rms_norm, rms_norm_ref


def make_step(impl: str, shape: dict, dtype: str, device: str):
    dt = getattr(torch, dtype)
    x = torch.randn(shape["T"], shape["hidden"], device=device, dtype=dt, requires_grad=True)
    w = torch.ones(shape["hidden"], device=device, dtype=dt, requires_grad=True)
    dy = torch.randn_like(x)
    fn = pick(impl, lambda x, w: rms_norm_ref(x, w, 1e-6), lambda x, w: rms_norm(x, w, 1e-6))
    return fwd_bwd_step(fn, [x, w], [dy])


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("rmsnorm", __doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args(argv)
    shapes = [{"T": args.tokens, "hidden": args.hidden}]
    harness.run_table("rmsnorm", "packtune.bench.rmsnorm:make_step", IMPLS, shapes, "torch", args)
