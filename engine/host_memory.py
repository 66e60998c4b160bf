"""Host memory of a training process on the CPU: a freed tensor's pages go back to the system at once.

glibc's malloc serves a large request from its own mapping (mmap) and returns it on free, until the
first such block is freed: from then on its threshold follows the largest block freed, up to 32 MiB,
and every tensor under it comes from the heap, whose freed holes stay resident (only the heap's top
is trimmed). A checkpointed step interleaves the long-lived block inputs with each block's
short-lived activations, so the heap keeps the holes of every block's activations and the process's
peak resident set grows with the row several times faster than the tensors alive at any moment
(measured in docs/long-context.md). `release_freed_tensors` fixes the threshold (which also
stops its adjustment), so blocks of at least `MMAP_THRESHOLD_BYTES` are mapped per tensor and unmapped
when it is freed; the resident set then follows the tensors alive. The cost is a page fault per
fresh page of such a tensor, which made CPU steps slower (by a tenth or more in a few noisy runs on a
loaded machine), so the Trainer does it only where the run already trades compute for memory: with
activation checkpointing on the CPU. No effect on CUDA memory, nor outside glibc (musl, macOS,
Windows), where this returns False.
"""

from __future__ import annotations

import ctypes
import platform

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc's malloc.h)."""
MMAP_THRESHOLD_BYTES = 1 << 20


def release_freed_tensors(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process; True when it was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
