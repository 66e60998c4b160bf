"""`packtune bench swiglu`: silu(gate) * up forward+backward, packtune vs torch eager vs torch.compile."""

from __future__ import annotations

import torch

from packtune.bench import harness
from packtune.bench.ops import IMPLS, fwd_bwd_step, pick
from packtune.kernels.swiglu import swiglu, swiglu_ref


def make_step(impl: str, shape: dict, dtype: str, device: str):
    dt = getattr(torch, dtype)
    gate, up = (torch.randn(shape["T"], shape["intermediate"], device=device, dtype=dt, requires_grad=True)
                for _ in range(2))
    dy = torch.randn_like(gate)
    return fwd_bwd_step(pick(impl, swiglu_ref, swiglu), [gate, up], [dy])


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("swiglu", __doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--intermediate", type=int, default=11008)
    args = parser.parse_args(argv)
    shapes = [{"T": args.tokens, "intermediate": args.intermediate}]
    harness.run_table("swiglu", "packtune.bench.swiglu:make_step", IMPLS, shapes, "torch", args)
