"""Triton, or a stand-in when it is not installed, so op files can define their kernels unguarded.

Also the Triton helpers several op files share (`_dot`).

Triton is a dependency on Linux only. Elsewhere the `@triton.jit` functions are defined as plain
Python functions that are never launched: `_dispatch` never picks the `triton` backend without
triton, and the `cpu` and `torch` backends still work.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    import types

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit, autotune=lambda *args, **kwargs: _jit,
                                   Config=lambda *args, **kwargs: None, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length())
    tl = types.SimpleNamespace(constexpr=int)

__all__ = ["triton", "tl"]


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b, fp32 accumulation; fp32 operands in full precision (not tf32). UPCAST computes
    bf16/fp16 operands in fp32 (the interpreter's tl.dot is wrong on bf16)."""
    if UPCAST or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc)
