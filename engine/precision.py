"""What a dtype name means, in one rule for training, evaluation and generation alike.

`auto` computes in bf16 on a GPU and in fp32 on a CPU (where bf16 matmuls are slower and, through
oneDNN, keep memory per distinct row length); `float32`, `bfloat16` and `float16` compute in that
dtype. Training always keeps fp32 master weights: a bf16 compute dtype means FSDP2's mixed
precision over them, and float16 is refused there (its gradients would need loss scaling).
"""

from __future__ import annotations

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def compute_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype `name` computes in on `device`."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)
