import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from packtune.kernels import _dispatch

needs_extension = pytest.mark.skipif(
    _dispatch.cpu_extension() is None and shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="packtune._C is not built and there is no C++ compiler to build it",
)


@needs_extension
def test_env_command_reports_this_machine():
    out = subprocess.run(
        [sys.executable, "-m", "packtune", "env"], capture_output=True, text=True, check=True
    ).stdout
    assert f"torch        {torch.__version__}" in out
    assert "packtune._C  built" in out, out
    if not torch.cuda.is_available():
        assert "no GPU" in out
        assert "interpreted" in out
    assert "flash-attn" in out
    assert "attention    CPU: SDPA over length buckets" in out


@needs_extension
def test_cpu_extension_reports_openmp_threads():
    ext = _dispatch.cpu_extension()
    assert ext is not None, "packtune._C did not build"
    assert ext.openmp_max_threads() >= 1
    assert ext.cpu_capability() in ("avx512", "avx2", "default")


@pytest.fixture
def fake_op():
    _dispatch.register_op("_test_op", ("triton", "cpu", "torch"))
    yield "_test_op"
    _dispatch._OPS.pop("_test_op")


def test_dispatch_defaults_by_device(fake_op, monkeypatch):
    monkeypatch.delenv("PACKTUNE_BACKEND", raising=False)
    assert _dispatch.resolve_backend(fake_op, "cpu") == "cpu"
    assert _dispatch.default_backend(fake_op, torch.device("cuda")) == "triton"
    assert _dispatch.resolve_backend(fake_op, "cpu", backend="torch") == "torch"
    assert _dispatch.resolve_backend(fake_op, "cpu", backend="triton") == "triton"  # interpreter


def test_dispatch_env_override_and_errors(fake_op, monkeypatch):
    monkeypatch.setenv("PACKTUNE_BACKEND", "torch")
    assert _dispatch.resolve_backend(fake_op, "cpu") == "torch"
    monkeypatch.setenv("PACKTUNE_BACKEND", "nope")
    with pytest.raises(ValueError, match="PACKTUNE_BACKEND"):
        _dispatch.resolve_backend(fake_op, "cpu")
    _dispatch.register_op("_test_torch_only", ("torch",))
    try:
        with pytest.raises(ValueError, match="no 'cpu' backend"):
            _dispatch.resolve_backend("_test_torch_only", "cpu", backend="cpu")
    finally:
        _dispatch._OPS.pop("_test_torch_only")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("PACKTUNE_BACKEND")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _dispatch.resolve_backend(fake_op, "cpu", backend="triton")


def test_kernels_never_import_the_engine():
    code = "import sys, packtune.kernels; print(sorted(m for m in sys.modules if m.startswith('packtune')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ}).stdout
    loaded = eval(out)
    assert all(m == "packtune" or m.startswith(("packtune.kernels", "packtune._C")) for m in loaded), loaded


def test_an_extension_that_fails_to_load_is_reported_not_hidden(monkeypatch):
    """Built against another torch (an undefined symbol): a warning with the real error, recorded
    for `packtune env`; plain absence stays silent."""
    real_import = importlib.import_module

    def failing(name, *args):
        if name == "packtune._C":
            raise ImportError("_C.so: undefined symbol: _ZN3c10")
        return real_import(name, *args)

    monkeypatch.setattr(_dispatch.importlib, "import_module", failing)
    monkeypatch.setattr(_dispatch, "LOAD_ERRORS", {})
    _dispatch.cpu_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="undefined symbol"):
            assert _dispatch.cpu_extension() is None
        assert "undefined symbol" in _dispatch.LOAD_ERRORS["packtune._C"]
        assert "failed to load" in _dispatch.why_not("cpu")
        from packtune.env import _cpu_ext_line

        assert "FAILED TO LOAD" in _cpu_ext_line()
    finally:
        _dispatch.cpu_extension.cache_clear()


@pytest.mark.parametrize("version", ["2.7.1", "2.5.0+cpu", "1.13.1"])
def test_torch_below_the_floor_fails_at_import_with_a_clear_message(version):
    import packtune

    with pytest.raises(ImportError, match=r"packtune needs torch>=2\.8 .* has torch " + re.escape(version)):
        packtune.check_torch(version)


@pytest.mark.parametrize("version", ["2.8.0", "2.11.0+cu128", "2.12.0a0+git1234", "3.0.0"])
def test_torch_at_or_above_the_floor_imports(version):
    import packtune

    packtune.check_torch(version)
