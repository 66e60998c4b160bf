"""Dropout masks from a counter-based generator (Philox 4x32-10): one seed, one mask, on every backend.

Element (row, col) of an `[N, C]` mask is decided by 32 random bits: Philox's 64-bit counter is
`row * ceil(C / 4) + col // 4`, its key the seed, and the element takes output `col % 4` of the
four words one Philox call gives. So one call decides four neighbouring elements (`tl.randint4x` in
the Triton kernels, `keep_tile`), and the mask of any tile can be regenerated anywhere, in any
order: the backward redraws it instead of storing it. An element is kept when its 32 bits, read
unsigned, are >= round(p * 2^32) (`keep_threshold`): probability 1 - p to 2^-32, decided in
integers so that no float conversion differs between Triton versions or devices.

`philox_keep` is the same computation in torch integer ops (any device, no host sync, traced by
torch.compile): the `torch` backend and the references draw the Triton kernels' mask bit for bit.

The seed is an int64 tensor on the tensors' device (`draw_seed`), never a host int: drawn from the
device's generator with no host read, so torch.compile traces the draw without a graph break, a
captured CUDA graph draws a new seed on each replay (torch's CUDA generator advances its offset per
replay), activation checkpointing replays the same seed (it restores the device's RNG state), and
a resumed run draws the seeds an uninterrupted one would (checkpoints save the RNG states).
"""

from __future__ import annotations

import torch

from packtune.kernels._triton import tl, triton

__all__ = ["draw_seed", "dropout_mask", "keep_threshold", "philox_keep", "seed_tensor"]

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32's multipliers (Triton's, Random123's)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # its key increments (the golden ratio, sqrt(3) - 1)
ROUNDS = 10


def keep_threshold(p: float) -> int:
    """An element survives dropout `p` when its 32 random bits (unsigned) are at least this."""
    return round(p * 2**32)


def draw_seed(device: torch.device | str, count: int | None = None) -> torch.Tensor:
    """A dropout seed (`count` None) or `count` seeds, int64 on `device`, from that device's
    generator (see the module docstring: no host read, new draws in each CUDA-graph replay)."""
    return torch.randint(0, 2**62, () if count is None else (count,), device=device, dtype=torch.int64)


def seed_tensor(seed: torch.Tensor | int | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`seed` (one, or several) as an int64 tensor on `device`: host ints are copied once, a
    tensor is used as is."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64)
    return torch.tensor(seed, dtype=torch.int64, device=device)


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for 32-bit `a` (int64 tensor) and `b`, without overflowing
    int64: `a` split into 16-bit halves, each product below 2^48."""
    low_part = (a & 0xFFFF) * b
    high_part = (a >> 16) * b
    low = (low_part + ((high_part & 0xFFFF) << 16)) & _M32
    high = (high_part + (low_part >> 16)) >> 16
    return high, low


def philox(seed: torch.Tensor, counter: torch.Tensor) -> list[torch.Tensor]:
    """Philox4x32-10 of the 64-bit `counter` (int64 tensor) under the 64-bit `seed`: four int64
    tensors holding 32-bit words, as `tl.randint4x(seed, counter)` returns them."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = c3 = torch.zeros_like(counter)
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return [c0, c1, c2, c3]


def philox_keep(shape: torch.Size | tuple[int, ...], p: float, seed: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask of `shape` (rows = all leading dimensions, C = the last) on `seed`'s device,
    bit for bit the one the Triton kernels draw (`keep_tile`)."""
    cols = shape[-1] if len(shape) else 1
    rows = 1
    for n in shape[:-1]:
        rows *= n
    groups = -(-cols // 4)
    counter = torch.arange(rows * groups, device=seed.device, dtype=torch.int64)
    words = torch.stack(philox(seed, counter), dim=-1).view(rows, 4 * groups)[:, :cols]
    return (words >= keep_threshold(p)).view(shape)


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, seed: torch.Tensor | int,
                 device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Inverted-dropout multiplier of `shape` (0 or 1 / (1 - p), in `dtype`) drawn from `seed`: the
    mask the Triton kernels apply."""
    keep = philox_keep(shape, p, seed_tensor(seed, torch.device(device)))
    return keep.to(dtype) / (1.0 - p)


@triton.jit
def keep_tile(seed, rows, col0, n_cols, threshold, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_N, BLOCK_C] keep-mask of rows `rows` (int64), columns col0 .. col0 + BLOCK_C - 1 of
    an [N, n_cols] mask; col0 a multiple of 4. One Philox call per four columns (tl.randint4x)."""
    groups = (n_cols + 3) // 4
    counter = rows[:, None] * groups + (col0 // 4 + tl.arange(0, BLOCK_C // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3)).reshape(BLOCK_N, BLOCK_C)  # column 4 j + c: r_c[j]
    return words.to(tl.int64) >= threshold


@triton.jit
def apply_dropout(v, keep, p):
    """Inverted dropout of fp32 `v`: kept elements scaled by 1 / (1 - p), the others zero."""
    return tl.where(keep, v / (1.0 - p), 0.0)
