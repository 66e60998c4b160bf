"""Rotary embedding frequencies (default, linear, dynamic NTK, llama3), as transformers computes them.

The float operations follow transformers' `modeling_rope_utils` step for step (fp32 inverse
frequencies, fp32 angles, cast to the activation dtype last), so positions rotate identically.
"""

from __future__ import annotations

import math

import torch

from packtune.model.config import ModelArgs


def inv_freq(args: ModelArgs, seq_len: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` in fp32.

    `seq_len` (the longest context in the call) matters only for dynamic NTK scaling, which
    raises the base once a sequence outgrows `max_position_embeddings`.
    """
    dim, base, scaling = args.head_dim, args.rope_theta, args.rope_scaling
    if scaling is not None and scaling.rope_type == "dynamic":
        max_pos = args.max_position_embeddings
        if seq_len is not None and seq_len > max_pos:
            # transformers recomputes with seq_len as a tensor: keep its fp32 rounding
            grown = torch.tensor(seq_len, device=device)
            base = base * ((scaling.factor * grown / max_pos) - (scaling.factor - 1)) ** (dim / (dim - 2))
        else:
            base = base * ((scaling.factor * max_pos / max_pos) - (scaling.factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    freq = 1.0 / (base**exponents)
    if scaling is None or scaling.rope_type == "dynamic":
        return freq
    if scaling.rope_type == "linear":
        return freq / scaling.factor
    return _llama3(
        freq,
        scaling.factor,
        scaling.low_freq_factor,
        scaling.high_freq_factor,
        scaling.original_max_position_embeddings,
    )


def _llama3(freq: torch.Tensor, factor: float, low: float, high: float, context: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    low_freq_wavelen = context / low
    high_freq_wavelen = context / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[*position_ids.shape, head_dim]` in the rotate-half layout (`cat(angles, angles)`)."""
    angles = position_ids[..., None].float() * freq.to(device=position_ids.device, dtype=torch.float)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
