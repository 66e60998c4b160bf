"""`packtune bench ce`: masked cross-entropy forward+backward on materialised logits.

Implementations: `torch` (eager F.cross_entropy, the baseline), `torch-compile` (the same under
torch.compile, default options), `packtune` (masked_cross_entropy, gradient into a new buffer)
and `packtune-inplace` (inplace_backward=True: the gradient overwrites the logits, so the step
needs no N x V buffer; later steps then run on the previous gradient, which costs the same), and
`liger` (Liger-Kernel's LigerCrossEntropyLoss) when liger_kernel is installed.
A step is `torch.autograd.grad(loss, logits)`, so no .grad accumulation is timed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from packtune.bench import harness

IMPLS = ("torch", "torch-compile", "packtune", "packtune-inplace",
         *(("liger",) if importlib.util.find_spec("liger_kernel") else ()))
SHAPES = ({"N": 2048, "V": 32000}, {"N": 1024, "V": 128256})


def make_labels(n: int, v: int, ignored: float, device: str) -> torch.Tensor:
    """Random labels with a fixed fraction of rows set to -100 (prompt tokens)."""
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.randperm(n, device=device)[: int(n * ignored)]] = -100
    return labels


def make_step(impl: str, shape: dict, dtype: str, device: str) -> Callable[[], object]:
    from packtune.kernels import masked_cross_entropy

    n, v = shape["N"], shape["V"]
    logits = torch.randn(n, v, dtype=getattr(torch, dtype), device=device).requires_grad_()
    labels = make_labels(n, v, shape.get("ignored", 0.0), device)
    if impl == "torch":
        loss_fn = F.cross_entropy
    elif impl == "torch-compile":
        loss_fn = torch.compile(F.cross_entropy)
    elif impl == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss

        loss_fn = LigerCrossEntropyLoss()
    elif impl in ("packtune", "packtune-inplace"):
        inplace = impl == "packtune-inplace"
        loss_fn = lambda x, y: masked_cross_entropy(x, y, inplace_backward=inplace)
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")

    def step():
        return torch.autograd.grad(loss_fn(logits, labels), logits)

    step()  # compile / first-touch outside the measurement
    return step


def main(argv: list[str] | None = None) -> None:
    parser = harness.bench_parser("ce", __doc__.splitlines()[0])
    parser.add_argument("--ignored", type=float, default=0.0, help="fraction of rows labelled -100")
    parser.add_argument("--shape", type=int, nargs=2, action="append", metavar=("N", "V"),
                        help="run only these shapes (repeatable); default: the two standard ones")
    args = parser.parse_args(argv)
    shapes = [dict(N=n, V=v) for n, v in args.shape] if args.shape else list(SHAPES)
    shapes = [dict(s, ignored=args.ignored) for s in shapes]
    harness.run_table("ce", "packtune.bench.ce:make_step", IMPLS, shapes, "torch", args)
