"""Python started in the repository root has the root first on sys.path, where kernels/ (packtune's
`packtune.kernels`) stands under the top-level name of Hugging Face's `kernels` package, which
transformers imports (`import peft` reaches it). The folder steps aside for the installed package."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_peft_and_transformers_hub_kernels_import_from_the_repository_root():
    pytest.importorskip("peft")
    done = run_in_root("import peft, transformers.integrations.hub_kernels, kernels, packtune.kernels;"
                       "print(kernels.__file__); print(packtune.kernels.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    hub, ours = done.stdout.split()
    assert Path(hub).parent != ROOT / "kernels" and Path(ours) == ROOT / "kernels" / "__init__.py"


def test_without_the_installed_package_the_bare_name_fails_in_one_line():
    done = run_in_root("import sys; sys.path[:] = ['']; import kernels")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: No module named 'kernels' outside") and "packtune.kernels" in last
