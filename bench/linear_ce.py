"""`packtune bench linear-ce`: lm_head matmul + masked cross-entropy, forward+backward.

Implementations: `torch` (eager F.linear + F.cross_entropy on materialised logits, the
baseline), `torch-compile` (the same function under torch.compile, default options) and
`packtune` (linear_cross_entropy: label rows only, in chunks, no N x V logits), and `liger`
(Liger-Kernel's LigerFusedLinearCrossEntropyLoss) when liger_kernel is installed. 30% of the labels
are -100 by default (prompt tokens). A step is `torch.autograd.grad(loss, (hidden, weight))`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from packtune.bench import harness
from packtune.bench.ce import make_labels

IMPLS = ("torch", "torch-compile", "packtune",
         *(("liger",) if importlib.util.find_spec("liger_kernel") else ()))
SHAPES = ({"N": 4096, "H": 1024, "V": 32000}, {"N": 2048, "H": 2048, "V": 128256})


def _eager(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight), labels)


def make_step(impl: str, shape: dict, dtype: str, device: str) -> Callable[[], object]:
    from packtune.kernels import linear_cross_entropy

    n, h, v = shape["N"], shape["H"], shape["V"]
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, dtype=dt, device=device).requires_grad_()
    weight = (torch.randn(v, h, dtype=dt, device=device) / h**0.5).requires_grad_()
    labels = make_labels(n, v, shape.get("ignored", 0.3), device)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        loss_fn = lambda hid, w, y: liger(w, hid, y)
    else:
        loss_fn = {"torch": _eager, "torch-compile": torch.compile(_eager),
                   "packtune": linear_cross_entropy}.get(impl)
    if loss_fn is None:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")

    def step():
        return torch.autograd.grad(loss_fn(hidden, weight, labels), (hidden, weight))

    step()  # compile / first-touch outside the measurement
    return step


def main(argv: list[str] | None = None) -> None:
    parser = harness.bench_parser("linear-ce", __doc__.splitlines()[0])
    parser.add_argument("--ignored", type=float, default=0.3, help="fraction of rows labelled -100")
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "H", "V"),
                        help="run only these shapes (repeatable); default: the two standard ones")
    args = parser.parse_args(argv)
    shapes = [dict(N=n, H=h, V=v) for n, h, v in args.shape] if args.shape else list(SHAPES)
    shapes = [dict(s, ignored=args.ignored) for s in shapes]
    harness.run_table("linear_ce", "packtune.bench.linear_ce:make_step", IMPLS, shapes, "torch", args)
