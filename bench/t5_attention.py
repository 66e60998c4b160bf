"""`packtune bench t5-attention`: T5's relative-position-biased self-attention over a packed row,
forward+backward, at FLAN-T5-base's attention shape (12 heads of 64).

Implementations: `segments` (SDPA per segment with its `[H, L, L]` bias: `varlen_relative_attention_ref`,
the baseline), `buckets` (the CPU path of `varlen_relative_attention`: segments of like length batched
into one SDPA call per bucket, the bucket's bias shared by its segments) and, on CUDA, `flex`
(FlexAttention with the bias as a score_mod, the CUDA path). The row holds segments of FLAN-like
lengths (a long tail of short ones and a few long ones), or those of a row of the T5 demo (`--row`);
the bias comes from T5's bucket table (32 buckets up to 128) and its gradient is part of the step. A
step is one forward and one backward of the output against a fixed gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from packtune.bench import harness

IMPLS = ("segments", "buckets", "flex")
ROWS = {
    # FLAN-like inputs (2090 tokens): 16 segments from 1 to 412 tokens, the encoder's bidirectional side
    "inputs": [412, 35, 8, 190, 77, 1, 260, 23, 140, 55, 300, 12, 90, 170, 48, 269],
    # FLAN-like targets (1024 tokens): 24 segments from 1 to 180 tokens, the decoder's causal side
    "targets": [180, 3, 25, 60, 1, 12, 95, 40, 7, 130, 18, 2, 75, 33, 9, 110, 21, 5, 50, 14, 88, 6, 28, 12],
    # a row of `packtune demo --model t5` (1,023 input tokens in 49 prompts of 14 to 28, bidirectional)
    "demo-inputs": [19, 27, 28, 28, 14, 18, 18, 22, 23, 28, 20, 20, 20, 17, 18, 22, 18, 27, 18, 18, 18,
        24, 27, 17, 17, 24, 17, 19, 17, 22, 23, 28, 24, 17, 14, 20, 28, 28, 23, 22, 22, 17, 17, 17, 20,
        24, 23, 14, 17],
    # its targets (250 tokens in 49 answers of 3 to 9, causal)
    "demo-targets": [4, 9, 4, 4, 5, 9, 5, 5, 5, 4, 5, 5, 5, 5, 5, 4, 5, 9, 5, 5, 5, 5, 4, 5, 5, 5, 3, 3,
        5, 4, 5, 4, 5, 3, 5, 5, 9, 9, 5, 5, 4, 5, 5, 5, 5, 5, 5, 5, 5],
}
"""Segment lengths of each row: FLAN-like rows (FLAN-T5-base's shape is the default) and a row of the
T5 demo (run it with `--heads 8 --head-dim 16`, the demo model's attention)."""


def make_step(impl: str, shape: dict, dtype: str, device: str) -> Callable[[], object]:
    from packtune.kernels.flex_segment_attention import flex_segment_attention
    from packtune.kernels.relative_attention import (
        bucketed_relative_attention,
        relative_bias,
        varlen_relative_attention_ref,
    )

    lengths, causal = ROWS[shape["row"]], shape["row"].endswith("targets")
    heads, dim, dt = shape["heads"], shape["head_dim"], getattr(torch, dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(sum(lengths), heads, dim, device=device, dtype=dt, requires_grad=True)
               for _ in range(3))
    table = torch.randn(32, heads, device=device, dtype=dt, requires_grad=True)
    dout = torch.randn_like(q)
    attend = {
        "segments": lambda q, k, v, b: varlen_relative_attention_ref(q, k, v, b, cu, causal=causal, scale=1),
        "buckets": lambda q, k, v, b: bucketed_relative_attention(q, k, v, b, cu, causal=causal, scale=1),
        "flex": lambda q, k, v, b: flex_segment_attention(q, k, v, cu, cu, causal=causal, scale=1, bias=b),
    }.get(impl)
    if attend is None:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
    if impl == "flex" and device == "cpu":
        raise ValueError("flex: FlexAttention has no backward on the CPU")

    def step() -> None:
        for t in (q, k, v, table):
            t.grad = None
        bias = relative_bias(table, max(lengths), bidirectional=not causal, max_distance=128)
        attend(q, k, v, bias).backward(dout)

    step()  # compile (flex) / first touch outside the measurement
    step.inputs = [q, k, v, table]
    return step


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("t5-attention", __doc__.splitlines()[0])
    parser.add_argument("--row", choices=list(ROWS), action="append",
                        help="the rows to run (repeatable); default: the FLAN-like inputs and targets")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    rows = args.row or ["inputs", "targets"]
    shapes = [{"row": row, "heads": args.heads, "head_dim": args.head_dim} for row in rows]
    impls = [i for i in IMPLS if i != "flex" or args.device.startswith("cuda")]
    harness.run_table("t5-attention", "packtune.bench.t5_attention:make_step", impls, shapes, "segments",
                      args)
