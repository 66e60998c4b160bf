"""Which implementation of an op runs: `triton`, `cpu` (packtune._C) or `torch` (the reference).

Each op file calls `register_op(name, backends)` with the backends it implements. The choice, per
call: the `backend=` argument if given (an error if that backend cannot run here), else the
`PACKTUNE_BACKEND` environment variable when the op has that backend and it can run on the
tensor's device, else the default for the device: `triton` on CUDA/ROCm, `cpu` on CPU when the
extension is built, `torch` otherwise.

`triton` also runs on CPU tensors when `TRITON_INTERPRET=1` (Triton's interpreter): the tests use
this to check every kernel without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("triton", "cpu", "torch")
_OPS: dict[str, tuple[str, ...]] = {}
LOAD_ERRORS: dict[str, str] = {}
"""Optional modules that are installed but failed to load (name -> the error): `packtune env`
shows them; absence is not an error and is not recorded."""


def broken_import(name: str, error: BaseException) -> None:
    """Record and warn (once per module) that `name` is present but does not load, e.g. built
    against another torch or missing a symbol: the slow path it leaves is not silent."""
    if name in LOAD_ERRORS:
        return
    LOAD_ERRORS[name] = f"{type(error).__name__}: {error}"
    warnings.warn(f"{name} is installed but failed to load ({LOAD_ERRORS[name]}); the slower fallback "
                  "runs instead. Rebuild or reinstall it against this torch.", RuntimeWarning, stacklevel=3)


def register_op(name: str, backends: tuple[str, ...]) -> None:
    """Declare that op `name` has implementations for `backends` (a subset of BACKENDS)."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"op {name!r}: unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    _OPS[name] = tuple(backends)


def registered_ops() -> dict[str, tuple[str, ...]]:
    return dict(_OPS)


@functools.cache
def triton_module() -> ModuleType | None:
    try:
        return importlib.import_module("triton")
    except ImportError:
        return None


def launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context a Triton launch runs in: the tensor's CUDA device made current (Triton launches
    on the current device, so `cuda:1` inputs under device 0 would be read from the wrong GPU);
    nothing to do for CPU tensors (the interpreter), nor under torch.compile, whose generated code
    guards the device itself."""
    if tensor.device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


@torch.compiler.assume_constant_result  # a property of the machine: a constant to torch.compile
@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (grid sizing; a host query, no sync)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def cpu_extension() -> ModuleType | None:
    """packtune._C if it was built and loads against this torch; None otherwise (a build that
    fails to load is recorded and warned about: `broken_import`)."""
    try:
        return importlib.import_module("packtune._C")
    except ModuleNotFoundError as e:
        if e.name != "packtune._C":  # the extension is there, something it needs is not
            broken_import("packtune._C", e)
        return None
    except (ImportError, OSError) as e:  # built for another torch, an undefined symbol, ...
        broken_import("packtune._C", e)
        return None


def backend_runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu" and cpu_extension() is not None
    if backend == "triton":
        if triton_module() is None:
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def default_backend(op: str, device: torch.device) -> str:
    backends = _OPS[op]
    if device.type == "cuda":
        return "triton" if "triton" in backends and backend_runs_on("triton", device) else "torch"
    if device.type == "cpu":
        return "cpu" if "cpu" in backends and backend_runs_on("cpu", device) else "torch"
    return "torch"


@torch.compiler.assume_constant_result  # torch.compile evaluates the choice once, at trace time
def resolve_backend(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """The backend that runs `op` for tensors on `device` (see the module docstring)."""
    device = torch.device(device)
    if op not in _OPS:
        raise KeyError(f"op {op!r} is not registered")
    if backend is not None:
        if backend not in _OPS[op]:
            raise ValueError(f"op {op!r} has no {backend!r} backend; it has {_OPS[op]}")
        if not backend_runs_on(backend, device):
            raise RuntimeError(f"backend {backend!r} cannot run {op!r} on {device.type}: {why_not(backend)}")
        return backend
    requested = os.environ.get("PACKTUNE_BACKEND")
    if requested:
        if requested not in BACKENDS:
            raise ValueError(f"PACKTUNE_BACKEND={requested!r}; choose from {BACKENDS}")
        if requested in _OPS[op] and backend_runs_on(requested, device):
            return requested
    return default_backend(op, device)


def why_not(backend: str) -> str:
    if backend == "cpu":
        if cpu_extension() is None:
            if "packtune._C" in LOAD_ERRORS:
                return f"packtune._C failed to load ({LOAD_ERRORS['packtune._C']})"
            return "packtune._C is not built (reinstall with a C++ compiler)"
        return "the cpu backend takes CPU tensors only"
    if backend == "triton":
        if triton_module() is None:
            return "triton is not installed"
        return "triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    return "unavailable"
