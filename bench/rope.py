"""`packtune bench rope`: rotary embedding of q and k on a packed row, forward+backward.

The row holds samples of `--sample-len` tokens; positions restart per sample from cu_seqlens in
every implementation (the reference derives them with the same searchsorted, inside the step).
"""

from __future__ import annotations

import torch

from packtune.bench import harness
from packtune.bench.ops import IMPLS, fwd_bwd_step, pick
from packtune.kernels.rotary import positions_from_cu_seqlens, rope_cos_sin, rotary, rotary_ref


def make_step(impl: str, shape: dict, dtype: str, device: str):
    dt = getattr(torch, dtype)
    t, d = shape["T"], shape["head_dim"]
    q = torch.randn(t, shape["heads"], d, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(t, shape["kv_heads"], d, device=device, dtype=dt, requires_grad=True)
    cu = torch.arange(0, t + 1, shape["sample_len"], device=device, dtype=torch.int32)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=device).float() / d)
    cos, sin = rope_cos_sin(inv_freq, shape["sample_len"])

    def reference(q, k):
        pos = positions_from_cu_seqlens(cu, t)
        return rotary_ref(q, cos, sin, pos), rotary_ref(k, cos, sin, pos)

    fn = pick(impl, reference, lambda q, k: rotary(q, k, cos, sin, cu_seqlens=cu))
    return fwd_bwd_step(fn, [q, k], [torch.randn_like(q), torch.randn_like(k)])


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("rope", __doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sample-len", type=int, default=512)
    args = parser.parse_args(argv)
    shapes = [{"T": args.tokens, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
               "sample_len": args.sample_len}]
    harness.run_table("rope", "packtune.bench.rope:make_step", IMPLS, shapes, "torch", args)
