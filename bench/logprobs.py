"""`packtune bench logprobs`: per-sequence label log-probs from hidden states and the lm_head, fwd+bwd.

Implementations: `torch` (eager F.linear, log_softmax in fp32, gather, segment sum: the baseline,
`linear_logprobs_ref`), `torch-compile` (the same function per token under torch.compile, default
options, then the segment sum: inductor's CPU code for a bf16 graph with index_add fails) and
`packtune` (linear_logprobs: label rows only, in chunks, no N x V logits; given the batch's
PackedLayout, as a trainer does, so the GPU step has no host sync). Rows are cut into segments of
`--segment-len` tokens (a sequence each) and 30% of the labels are -100 by default (prompt tokens).
A step is `torch.autograd.grad(logp, (hidden, weight), upstream)` with a fixed upstream gradient
per segment of both signs (as DPO's chosen and rejected get); with `--frozen-weight` the lm_head
is frozen, as under LoRA and QLoRA, and the step wants dHidden alone. Default shape: a CPU-sized one
on CPU, Llama-3-8B's lm_head (N=8192, H=4096, V=128256) on CUDA.

`--from-logits` measures the log-softmax-and-gather part alone, from given logits [N, V] (H unused):
`torch` is `logprobs_ref` (TRL's `selective_log_softmax`: log_softmax in fp32, gather; then the
segment sum), `packtune` is `logprobs` (the CE row kernel, its gradient formed in the forward) and
`packtune-inplace` the same with `inplace_backward=True` (the gradient written over the logits).
Since that overwrites the logits, its step first copies them back from a second copy made in setup:
the copy is timed (a cost the others do not pay), the setup copy not counted in peak memory (it
stands for the lm_head's output, which every implementation's logits are).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from packtune.bench import harness
from packtune.bench.ce import make_labels

IMPLS = ("torch", "torch-compile", "packtune")
FROM_LOGITS_IMPLS = (*IMPLS, "packtune-inplace")
SHAPES = {"cpu": ({"N": 4096, "H": 1024, "V": 32000},), "cuda": ({"N": 8192, "H": 4096, "V": 128256},)}


def make_step(impl: str, shape: dict, dtype: str, device: str) -> Callable[[], object]:
    from packtune.kernels import PackedLayout, layout_segments, linear_logprobs, linear_logprobs_ref
    from packtune.kernels.logprobs import segment_sum

    if shape.get("from_logits"):
        return _logits_step(impl, shape, dtype, device)

    n, h, v, seg_len = shape["N"], shape["H"], shape["V"], shape.get("segment_len", 256)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, dtype=dt, device=device).requires_grad_()
    frozen = shape.get("frozen_weight", False)
    weight = (torch.randn(v, h, dtype=dt, device=device) / h**0.5).requires_grad_(not frozen)
    wanted = (hidden,) if frozen else (hidden, weight)
    labels = make_labels(n, v, shape.get("ignored", 0.3), device)
    lens = np.diff(np.append(np.arange(0, n, seg_len), n))
    layout = PackedLayout.packed(lens, labels.cpu()).to(device)
    ids, num_segments = layout_segments(layout)
    upstream = torch.randn(num_segments, device=device)
    if impl == "packtune":
        logp_fn = lambda hid, w: linear_logprobs(hid, w, labels, ids, num_segments, layout=layout)
    elif impl in ("torch", "torch-compile"):
        if impl == "torch":
            logp_fn = lambda hid, w: linear_logprobs_ref(hid, w, labels, ids, num_segments)
        else:
            compiled = torch.compile(linear_logprobs_ref)
            logp_fn = lambda hid, w: segment_sum(compiled(hid, w, labels), ids, num_segments)
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")

    def step():
        return torch.autograd.grad(logp_fn(hidden, weight), wanted, upstream)

    step()  # compile / first-touch outside the measurement
    return step


def _logits_step(impl: str, shape: dict, dtype: str, device: str) -> Callable[[], object]:
    from packtune.kernels import logprobs, logprobs_ref
    from packtune.kernels.logprobs import segment_sum

    n, v, seg_len = shape["N"], shape["V"], shape.get("segment_len", 256)
    logits = (torch.randn(n, v, device=device) * 2).to(getattr(torch, dtype)).requires_grad_()
    labels = make_labels(n, v, shape.get("ignored", 0.3), device)
    segments = torch.arange(n, device=device) // seg_len
    num_segments = (n - 1) // seg_len + 1
    upstream = torch.randn(num_segments, device=device)
    fresh = logits.detach().clone() if impl == "packtune-inplace" else None
    if impl in ("packtune", "packtune-inplace"):
        inplace = impl == "packtune-inplace"
        logp_fn = lambda x: logprobs(x, labels, segments, num_segments, inplace_backward=inplace)
    elif impl in ("torch", "torch-compile"):
        if impl == "torch":
            logp_fn = lambda x: logprobs_ref(x, labels, segments, num_segments)
        else:
            compiled = torch.compile(logprobs_ref)
            logp_fn = lambda x: segment_sum(compiled(x, labels), segments, num_segments)
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose from {FROM_LOGITS_IMPLS}")

    def step():
        if fresh is not None:
            with torch.no_grad():
                logits.copy_(fresh)
        return torch.autograd.grad(logp_fn(logits), (logits,), upstream)

    step()
    return step


def main(argv: list[str] | None = None) -> None:
    parser = harness.bench_parser("logprobs", __doc__.splitlines()[0])
    parser.add_argument("--ignored", type=float, default=0.3, help="fraction of rows labelled -100")
    parser.add_argument("--segment-len", type=int, default=256, help="tokens per segment (sequence)")
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "H", "V"),
                        help="run only these shapes (repeatable); default: one per device (see above)")
    parser.add_argument("--frozen-weight", action="store_true",
                        help="freeze the lm_head (LoRA, QLoRA): the step's gradient is dHidden alone")
    parser.add_argument("--from-logits", action="store_true",
                        help="log_softmax + gather alone, from given logits (logprobs, also in place)")
    args = parser.parse_args(argv)
    default = SHAPES["cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    shapes = [dict(N=n, H=h, V=v) for n, h, v in args.shape] if args.shape else list(default)
    shapes = [dict(s, ignored=args.ignored, segment_len=args.segment_len) for s in shapes]
    if args.frozen_weight:
        shapes = [dict(s, frozen_weight=True) for s in shapes]
    if args.from_logits:
        shapes = [dict({k: x for k, x in s.items() if k != "H"}, from_logits=True) for s in shapes]
    impls = FROM_LOGITS_IMPLS if args.from_logits else IMPLS
    harness.run_table("logprobs", "packtune.bench.logprobs:make_step", impls, shapes, "torch", args)
