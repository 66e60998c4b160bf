"""`packtune env`: what this machine offers packtune, and which backend each op will use."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys

import torch

import packtune
from packtune import kernels
from packtune.kernels import _dispatch
from packtune.kernels.attention import describe_attention_paths


def _torch_line() -> str:
    accel = "no GPU"
    if torch.cuda.is_available():
        kind = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        accel = f"{kind}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{torch.__version__} ({accel})"


def _triton_line() -> str:
    triton = _dispatch.triton_module()
    if triton is None:
        return "not installed: GPU tensors use the PyTorch reference"
    if _dispatch.triton_interpreted():
        return f"{triton.__version__}, interpreted (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly"
    if torch.cuda.is_available():
        return f"{triton.__version__}, compiled for the GPU"
    return f"{triton.__version__}, installed; no GPU here, so kernels run only under TRITON_INTERPRET=1"


def _linear_ce_line() -> str:
    from packtune.kernels.linear_cross_entropy import ADDMM_OUT_DTYPE, GPU_LOGITS_BYTES, default_chunk_size

    gpu = default_chunk_size(8192, 4096, 128256, "cuda", 2)
    cuda_dw = "cuBLAS addmm out_dtype=float32 on CUDA" if ADDMM_OUT_DTYPE else "vocabulary slabs on CUDA too"
    return (f"chunks of ~N*H/V rows (>= 128) on CPU; on CUDA a power of two in [1024, 4096] within "
            f"{GPU_LOGITS_BYTES >> 20} MiB of logits ({gpu} at V=128256 bf16); dW summed in fp32 "
            f"({cuda_dw}, vocabulary slabs on CPU)")


def _cpu_ext_line() -> str:
    ext = _dispatch.cpu_extension()
    if ext is None and "packtune._C" in _dispatch.LOAD_ERRORS:
        return f"FAILED TO LOAD: {_dispatch.LOAD_ERRORS['packtune._C']}; CPU ops use the PyTorch reference"
    if ext is None:
        return "not built: CPU ops use the PyTorch reference"
    return f"built ({ext.cpu_capability()}), OpenMP threads: {ext.openmp_max_threads()}"


def _flash_line(installed: bool) -> str:
    if "flash_attn" in _dispatch.LOAD_ERRORS:
        return f"installed but FAILED TO LOAD: {_dispatch.LOAD_ERRORS['flash_attn']}"
    return "installed" if installed else "not installed"


PEERS = ("transformers", "peft", "trl", "accelerate", "kernels", "torchao", "liger_kernel")
"""The optional packages packtune is compared with or integrates into (read from their metadata,
not imported): the versions a bug report needs."""


def _peers_line() -> str:
    found = []
    for name in PEERS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def report() -> str:
    """The text `packtune env` prints."""
    flash = importlib.util.find_spec("flash_attn") is not None
    if flash:
        from packtune.kernels.attention import _flash_attn

        _flash_attn()  # records a load failure in _dispatch.LOAD_ERRORS
    lines = [
        f"packtune     {packtune.__version__}",
        f"python       {sys.version.split()[0]} ({platform.machine()}, {platform.system()})",
        f"torch        {_torch_line()}; packtune needs >= {'.'.join(map(str, packtune.TORCH_MIN))}",
        f"triton       {_triton_line()}",
        f"flash-attn   {_flash_line(flash)}",
        f"attention    {describe_attention_paths()}",
        f"linear CE    {_linear_ce_line()}",
        f"packtune._C  {_cpu_ext_line()}",
        f"threads      torch intra-op: {torch.get_num_threads()}",
        f"packages     {_peers_line()}",
    ]
    ops = kernels.registered_ops()
    if ops:
        lines.append("")
        lines.append(f"{'op':<24}{'CPU tensors':<14}{'GPU tensors':<14}available")
        for op, backends in sorted(ops.items()):
            cpu = _dispatch.resolve_backend(op, "cpu")
            gpu = _dispatch.default_backend(op, torch.device("cuda"))
            lines.append(f"{op:<24}{cpu:<14}{gpu:<14}{', '.join(backends)}")
    return "\n".join(lines)
