"""Builds the optional C++ CPU kernels (packtune._C) next to the pure-Python package.

The extension is skipped, with a warning, when torch's C++ toolchain is unavailable: every op then
runs through its PyTorch reference, and `packtune env` says so. Install with
`pip install --no-build-isolation -e .` after torch, so the extension builds against the torch
that will import it.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
PACKAGE_DIRS = {"packtune": "engine", "packtune.kernels": "kernels", "packtune.bench": "bench"}


def find_packages() -> list[str]:
    """Every folder holding an __init__.py under the three mapped roots, as dotted names."""
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            packages.append(".".join((name, *rel.parts)))
    return packages


def cpu_extension() -> tuple[list, dict]:
    if os.environ.get("PACKTUNE_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("packtune: torch not importable at build time; skipping packtune._C", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("packtune: no C++ compiler found; skipping packtune._C", file=sys.stderr)
        return [], {}
    # -O3 with a portable x86-64 baseline (no -march=native) so a built wheel runs on other CPUs;
    # ATen's Vectorized<float> picks AVX2/AVX-512 paths through its own CPU dispatch where it can.
    ext = CppExtension(
        "packtune._C",
        sorted(glob.glob("csrc/*.cpp")),
        extra_compile_args=["-O3", "-g0", "-std=c++17", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = cpu_extension()
setup(packages=find_packages(), package_dir=PACKAGE_DIRS, ext_modules=ext_modules, cmdclass=cmdclass)
