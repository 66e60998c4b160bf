"""MXFP4 expert weights (gpt-oss checkpoints), dequantised as transformers' integration reads them
(transformers/integrations/mxfp4.py, `convert_moe_packed_tensors`).

A stored matrix [E, out, in] becomes `<name>_blocks` uint8 [E, out, in / 32, 16] and `<name>_scales`
uint8 [E, out, in / 32]: each byte of a block holds two FP4 (E2M1) codes, the low nibble first; the
32 values of a block share the scale 2 ** (scale - 127). Dequantised, the [E, out, in] matrix is
transposed to gpt-oss's in-by-out [E, in, out] (`experts.gate_up_proj` [E, H, 2I], `experts.down_proj`
[E, I, H]). Every FP4 value times a power of two is exact in fp32, which packtune dequantises in.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The value of each 4-bit code (E2M1: sign, two exponent bits, one mantissa bit)."""


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [E, in, out] from blocks [E, out, in / 32, 16] and scales [E, out, in / 32]."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    codes = blocks.to(torch.uint8)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low, high = (codes & 0x0F).to(torch.int64), (codes >> 4).to(torch.int64)
    values = torch.stack([lut[low], lut[high]], dim=-1)  # the low nibble holds the first value
    values = torch.ldexp(values.flatten(-2), (scales.to(torch.int32) - 127)[..., None])
    return values.flatten(-2).transpose(1, 2).contiguous()


def dequantized_shape(blocks: tuple[int, ...], scales: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `dequantize` gives for these stored shapes ((-1,) when they do not match)."""
    if len(blocks) != 4 or blocks[:-1] != scales:
        return (-1,)
    experts, out, groups, size = blocks
    return (experts, groups * size * 2, out)
