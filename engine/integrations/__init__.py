"""packtune inside other trainers: `apply_packtune` for transformers models, `PackedCollator`.

Names load lazily, so `import packtune.integrations` needs neither transformers nor the kernels.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "PackedCollator": "packtune.integrations.collator",
    "pack_samples": "packtune.integrations.collator",
    "apply_packtune": "packtune.integrations.transformers",
    "remove_packtune": "packtune.integrations.transformers",
    "UnsupportedModelError": "packtune.integrations.transformers",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'packtune.integrations' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
