"""`packtune bench swiglu`: act(gate) * up forward+backward, packtune vs torch eager vs torch.compile.

One gated kernel (packtune.kernels.glu) serves both activations: silu (SwiGLU, the default) and
`--activation gelu_tanh` (GeGLU, Gemma's MLP).
"""

from __future__ import annotations

import torch

from packtune.bench import harness
from packtune.bench.ops import IMPLS, fwd_bwd_step, pick
from packtune.kernels.glu import ACTIVATIONS, glu, glu_ref


def make_step(impl: str, shape: dict, dtype: str, device: str):
    dt = getattr(torch, dtype)
    activation = shape["activation"]
    gate, up = (torch.randn(shape["T"], shape["intermediate"], device=device, dtype=dt, requires_grad=True)
                for _ in range(2))
    dy = torch.randn_like(gate)
    reference = lambda g, u: glu_ref(g, u, activation)
    fused = lambda g, u: glu(g, u, activation)
    return fwd_bwd_step(pick(impl, reference, fused), [gate, up], [dy])


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("swiglu", __doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--activation", default="silu", choices=ACTIVATIONS)
    args = parser.parse_args(argv)
    shapes = [{"T": args.tokens, "intermediate": args.intermediate, "activation": args.activation}]
    harness.run_table("swiglu", "packtune.bench.swiglu:make_step", IMPLS, shapes, "torch", args)
