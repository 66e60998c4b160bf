"""packtune: supervised fine-tuning of decoder-only LLMs on packed, loss-masked sequences.

Attributes load lazily (PEP 562) so that `import packtune.kernels` or `packtune._C` never pulls
in the engine, and the engine's heavier modules load only when used. Importing packtune fails
with a clear message on a torch older than its floor (TORCH_MIN).
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from typing import Any

__version__ = "0.1.0"

TORCH_MIN = (2, 8)
"""The oldest torch packtune runs on: FSDP2's `FSDPModule.set_force_sum_reduction_for_comms` (the
sharded training's sum-only reductions) arrived in 2.8; `torch.nn.utils.get_total_norm` (clipping
over sharded gradients) and the public `torch.distributed.fsdp.fully_shard` in 2.6. torch's
`varlen_attn` is optional (the CUDA attention path uses it when this torch has it)."""


def check_torch(version: str) -> None:
    """Raise ImportError, naming the floor, when torch `version` ("2.11.0+cu128", "2.12.0a0+git1")
    is older than TORCH_MIN."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) < TORCH_MIN:
        floor = ".".join(map(str, TORCH_MIN))
        raise ImportError(f"packtune needs torch>={floor} (FSDP2's set_force_sum_reduction_for_comms, "
                          f"get_total_norm); this environment has torch {version}. Upgrade torch: "
                          f"pip install 'torch>={floor}'")


def _check_installed_torch() -> None:
    """Read from the package metadata, so the check does not import torch."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return  # a source build without metadata: `import torch` itself decides
    check_torch(version)


_check_installed_torch()

_LAZY: dict[str, str] = {
    "Config": "packtune.config",
    "load_config": "packtune.config",
    "load_pretrained": "packtune.model.hf_io",
    "save_pretrained": "packtune.model.hf_io",
    "prepare_dataset": "packtune.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'packtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
