"""Rotary embedding frequencies (default, linear, dynamic NTK, llama3, YaRN, Phi-3's longrope), as
transformers computes them.

The float operations follow transformers' `modeling_rope_utils` step for step (fp32 inverse
frequencies, fp32 angles); the tables stay fp32 (transformers casts them to the activation dtype,
packtune's rotary kernel computes in fp32), so positions rotate identically in fp32 and at least
as accurately in bf16.
"""

from __future__ import annotations

import math

import torch

from packtune.model.config import ModelArgs


def inv_freq(args: ModelArgs, seq_len: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies `[rotary_dim // 2]` in fp32 (rotary_dim: head_dim unless partial rotary).

    `seq_len` (the longest context in the call) matters only for dynamic NTK scaling, which
    raises the base once a sequence outgrows `max_position_embeddings`, and for longrope, whose
    long factors replace the short ones once it outgrows `original_max_position_embeddings`.
    """
    dim, base, scaling = args.rotary_dim, args.rope_theta, args.rope_scaling
    if scaling is not None and scaling.rope_type == "longrope":
        long = seq_len is not None and seq_len > scaling.original_max_position_embeddings
        factors = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32,
                               device=device)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (factors * base**exponents)
    if scaling is not None and scaling.rope_type == "yarn":
        return _yarn(dim, base, scaling, device)
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


def longrope_rows(positions: torch.Tensor, cu_seqlens: torch.Tensor, original_max: int,
                  offset: int) -> torch.Tensor:
    """Each token's row in longrope's tables stacked [short; long] (`offset` rows each).

    transformers' longrope uses the long factors for a whole sequence longer than
    `original_max_position_embeddings`, the short ones otherwise; a packed row decides per sample,
    as each sample alone would get: its position, plus `offset` in a sample longer than that.
    """
    cu = cu_seqlens.to(positions.device, torch.int64)
    lengths = cu[1:] - cu[:-1]
    tokens = torch.arange(positions.numel(), device=positions.device)
    sample = torch.searchsorted(cu[1:], tokens, right=True).clamp(max=lengths.numel() - 1)
    return positions.reshape(-1) + offset * (lengths[sample] > original_max)


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


def _yarn(dim: int, base: float, scaling, device: torch.device | None) -> torch.Tensor:
    """YaRN (transformers' `_compute_yarn_parameters`): frequencies that turn fewer than `beta_slow`
    times over the original context are divided by `factor`, those turning more than `beta_fast`
    times are kept, and a linear ramp over the dimensions between blends the two."""
    original = scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


class RopeTables:
    """fp32 cos/sin tables `[length, rotary_dim]`, row p for position p, built once per device and
    grown (doubling) when a batch reaches past them; `kernels.rotary` indexes them by the layout's
    positions. Dynamic NTK scaling changes the frequencies with the context length: beyond
    `max_position_embeddings` the tables are rebuilt for that length (the last one is kept).
    Longrope stacks two tables, `[2 * length, rotary_dim]`: the short factors' rows, then the long
    factors' (both scaled by the attention factor); `longrope_rows` picks a token's row. YaRN's
    tables are scaled by its attention factor too.

    A plain cache, not registered buffers: a model built on the meta device and materialised with
    `to_empty` (as the Trainer does) would leave buffers uninitialised, and FSDP need not shard them.
    """

    def __init__(self, args: ModelArgs) -> None:
        self.args = args
        self._tables: dict[torch.device, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables covering positions 0 .. seq_len - 1 (`seq_len` a host int: no sync)."""
        args, scaling = self.args, self.args.rope_scaling
        dynamic = scaling is not None and scaling.rope_type == "dynamic"
        longrope = scaling is not None and scaling.rope_type == "longrope"
        key = seq_len if dynamic and seq_len > args.max_position_embeddings else 0  # 0: the base frequencies
        cached = self._tables.get(device)
        if cached is not None and cached[0] == key and cached[1].shape[0] // (1 + longrope) >= seq_len:
            return cached[1], cached[2]
        if key:
            length, freqs = seq_len, [inv_freq(args, seq_len, device=device)]
        else:
            length, freqs = max(64, 1 << (max(seq_len, 1) - 1).bit_length()), [inv_freq(args, device=device)]
        if longrope:
            freqs.append(inv_freq(args, scaling.original_max_position_embeddings + 1, device=device))
        positions = torch.arange(length, device=device, dtype=torch.float32)
        angles = torch.cat([torch.outer(positions, freq) for freq in freqs])
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if longrope or (scaling is not None and scaling.rope_type == "yarn"):
            # as transformers: fp32 tables times a Python float
            cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
        self._tables[device] = (key, cos, sin)
        return cos, sin
