"""Step aside when this folder is imported as the top-level name `kernels`.

Python started in packtune's repository root (`python -c`, `python -m`, a notebook or REPL there) puts
the root first on sys.path, so `import kernels` finds this folder instead of Hugging Face's `kernels`
package, which transformers imports (`from kernels import CUDAProperties`, reached by `import peft`).
packtune's own name for this folder is `packtune.kernels`, so an import under the bare name is never
meant for it: the installed package is loaded under that name in its place.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def load_installed_kernels() -> None:
    """Put the installed `kernels` package in sys.modules["kernels"] (the import machinery returns
    that entry once this folder's __init__ finishes), or raise ImportError in one line saying why."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"No module named 'kernels' outside {root}: its kernels/ folder is packtune.kernels, found "
            "because Python started in that folder; install Hugging Face's kernels package or start "
            "Python elsewhere (or with python -P)",
            name="kernels",
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
    finally:
        sys.modules.pop(__name__, None)  # this helper was loaded as kernels._shadowed: not the package's
