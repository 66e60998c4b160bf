"""`packtune bench logprobs`: per-sequence label log-probs from hidden states and the lm_head, fwd+bwd.

Implementations: `torch` (eager F.linear, log_softmax in fp32, gather, segment sum: the baseline,
`linear_logprobs_ref`), `torch-compile` (the same function under torch.compile, default options)
and `packtune` (linear_logprobs: label rows only, in chunks, no N x V logits; given the batch's
PackedLayout, as a trainer does, so the GPU step has no host sync). Rows are cut into segments of
`--segment-len` tokens (a sequence each) and 30% of the labels are -100 by default (prompt tokens).
A step is `torch.autograd.grad(logp, (hidden, weight), upstream)` with a fixed upstream gradient
per segment of both signs (as DPO's chosen and rejected get). Default shape: a CPU-sized one on
CPU, Llama-3-8B's lm_head (N=8192, H=4096, V=128256) on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from packtune.bench import harness
from packtune.bench.ce import make_labels

IMPLS = ("torch", "torch-compile", "packtune")
SHAPES = {"cpu": ({"N": 4096, "H": 1024, "V": 32000},), "cuda": ({"N": 8192, "H": 4096, "V": 128256},)}


def make_step(impl: str, shape: dict, dtype: str, device: str) -> Callable[[], object]:
    from packtune.kernels import PackedLayout, layout_segments, linear_logprobs, linear_logprobs_ref

    n, h, v, seg_len = shape["N"], shape["H"], shape["V"], shape.get("segment_len", 256)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, dtype=dt, device=device).requires_grad_()
    weight = (torch.randn(v, h, dtype=dt, device=device) / h**0.5).requires_grad_()
    labels = make_labels(n, v, shape.get("ignored", 0.3), device)
    lens = np.diff(np.append(np.arange(0, n, seg_len), n))
    layout = PackedLayout.packed(lens, labels.cpu()).to(device)
    ids, num_segments = layout_segments(layout)
    upstream = torch.randn(num_segments, device=device)
    if impl == "packtune":
        logp_fn = lambda hid, w: linear_logprobs(hid, w, labels, ids, num_segments, layout=layout)
    elif impl in ("torch", "torch-compile"):
        ref = torch.compile(linear_logprobs_ref) if impl == "torch-compile" else linear_logprobs_ref
        logp_fn = lambda hid, w: ref(hid, w, labels, ids, num_segments)
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")

    def step():
        return torch.autograd.grad(logp_fn(hidden, weight), (hidden, weight), upstream)

    step()  # compile / first-touch outside the measurement
    return step


def main(argv: list[str] | None = None) -> None:
    parser = harness.bench_parser("logprobs", __doc__.splitlines()[0])
    parser.add_argument("--ignored", type=float, default=0.3, help="fraction of rows labelled -100")
    parser.add_argument("--segment-len", type=int, default=256, help="tokens per segment (sequence)")
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "H", "V"),
                        help="run only these shapes (repeatable); default: one per device (see above)")
    args = parser.parse_args(argv)
    default = SHAPES["cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    shapes = [dict(N=n, H=h, V=v) for n, h, v in args.shape] if args.shape else list(default)
    shapes = [dict(s, ignored=args.ignored, segment_len=args.segment_len) for s in shapes]
    harness.run_table("logprobs", "packtune.bench.logprobs:make_step", IMPLS, shapes, "torch", args)
