"""Shared pieces of the per-token op benchmarks (rope, rmsnorm, swiglu): the three contenders.

`torch`: the op's PyTorch reference in eager mode (the baseline); `compile`: the same reference
under torch.compile (inductor); `packtune`: packtune's op with its default backend for the
device (the C++ kernel on CPU, Triton on CUDA). A step is one forward and one backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IMPLS = ("torch", "compile", "packtune")


def pick(impl: str, reference: Callable, fused: Callable) -> Callable:
    if impl == "torch":
        return reference
    if impl == "compile":
        return torch.compile(reference, dynamic=False)
    if impl == "packtune":
        return fused
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def fwd_bwd_step(fn: Callable, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], None]:
    """One forward of fn(*inputs) and one backward of its output(s) against `grads` (the step keeps
    its `inputs`, whose .grad a test can compare across implementations)."""

    def step() -> None:
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grads)

    step.inputs = inputs
    return step
