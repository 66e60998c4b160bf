"""QLoRA's frozen base: weights stored as torchao's NF4 tensor (4-bit NormalFloat, double-quantised
block scales, as in the QLoRA paper and torchtune), dequantised per layer when a LoRA linear runs.

torchao is the optional `qlora` extra (`pip install packtune[qlora]`); everything else in packtune
works without it. Blocks of 64 weights share one scale (QLoRA's choice); the scales are quantised
again in groups of 256, or of the largest power of two that divides a small layer's block count.
"""

from __future__ import annotations

import torch

from packtune.errors import ConfigError

BLOCK_SIZE = 64
SCALER_BLOCK_SIZE = 256


def _torchao():
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise ConfigError("lora.base_dtype = \"nf4\" (QLoRA) needs torchao: pip install 'packtune[qlora]' "
                          "(or torchao); use base_dtype = \"auto\" for LoRA over an unquantised base"
                          ) from None
    if not hasattr(quantization, "to_nf4"):
        raise ConfigError("lora.base_dtype = \"nf4\": this torchao has no NF4 tensor "
                          "(torchao.quantization.to_nf4); "
                          "install torchao >= 0.18")
    return quantization


def check_nf4_available() -> None:
    """Raise ConfigError now (before the data is tokenized) when QLoRA cannot run."""
    _torchao()


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] as an NF4 tensor (bf16 scales, as torchtune stores QLoRA bases)."""
    blocks, rest = divmod(weight.numel(), BLOCK_SIZE)
    if rest:
        raise ValueError(f"NF4 needs a multiple of {BLOCK_SIZE} weights per layer, "
                         f"got shape {tuple(weight.shape)}")
    scaler_block = SCALER_BLOCK_SIZE
    while blocks % scaler_block:
        scaler_block //= 2
    return _torchao().to_nf4(weight.detach().to(torch.bfloat16), BLOCK_SIZE, scaler_block)


def nf4_bytes(weight: torch.Tensor) -> int:
    """Storage of an NF4 tensor: its packed 4-bit codes, quantised scales and constants."""
    names, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in names)
