"""Triton, or a stand-in when it is not installed, so op files can define their kernels unguarded.

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

    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length())
    tl = types.SimpleNamespace(constexpr=int)

__all__ = ["triton", "tl"]
