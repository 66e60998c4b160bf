"""packtune: supervised fine-tuning of decoder-only LLMs on packed, loss-masked sequences.

Attributes load lazily (PEP 562) so that `import packtune.kernels` or `packtune._C` never pulls
in the engine, and the engine's heavier modules load only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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
