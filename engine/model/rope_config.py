"""How a Hugging Face config.json describes RoPE, read into `ModelArgs` and written back: the theta and
scaling block in both layouts (transformers 4's `rope_theta` + `rope_scaling`, 5's `rope_parameters`),
llama3 / linear / dynamic / yarn scaling, longrope, partial rotary. What only one family does with them
(Phi-3's longrope and partial rotary, Gemma 3's two blocks) is in that family's file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from packtune.errors import ModelError

if TYPE_CHECKING:
    from packtune.model.config import ModelArgs

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (the `rope_scaling` / `rope_parameters` block of config.json)."""

    rope_type: str
    """linear, dynamic, llama3, yarn or longrope (Phi-3)."""
    factor: float
    low_freq_factor: float = 1.0
    """llama3 only."""
    high_freq_factor: float = 4.0
    """llama3 only."""
    original_max_position_embeddings: int = 0
    """llama3, yarn and longrope: the pretraining context length."""
    short_factor: tuple[float, ...] = ()
    """longrope only: per-frequency divisors for sequences up to original_max_position_embeddings."""
    long_factor: tuple[float, ...] = ()
    """longrope only: the divisors for longer sequences."""
    attention_factor: float = 1.0
    """longrope and yarn: the scale of cos and sin."""
    beta_fast: float = 32.0
    """yarn only: rotations per context above which a frequency is kept (extrapolated)."""
    beta_slow: float = 1.0
    """yarn only: rotations per context below which a frequency is divided by `factor` (interpolated)."""
    truncate: bool = True
    """yarn only: the ramp's bounds rounded outwards to whole dimensions (gpt-oss: false)."""


def rope_block(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})


def partial_rotary_factor(cfg: dict[str, Any]) -> float:
    """The leading fraction of each head that rotates (top level or in the rope block), in (0, 1]."""
    partial = rope_block(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    partial = 1.0 if partial is None else partial
    if not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise ModelError(f"partial_rotary_factor={partial!r} must be in (0, 1]")
    return float(partial)


def whole_heads(cfg: dict[str, Any], model_type: str) -> None:
    """Refuse a partial rotary factor for a family whose transformers code rotates whole heads."""
    partial = rope_block(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelError(f"partial_rotary_factor={partial} is not supported for {model_type} (only 1.0)")


def rope_type(cfg: dict[str, Any]) -> str:
    """The scaling type the rope block names ("default" without one; `type` is the old key)."""
    params = rope_block(cfg)
    return params.get("rope_type", params.get("type", "default")) or "default"


def parse_rope(cfg: dict[str, Any], max_positions: int) -> tuple[float, RopeScaling | None]:
    """Both layouts: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (5)."""
    params = rope_block(cfg)
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    params.pop("partial_rotary_factor", None)  # read by partial_rotary_factor
    rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ModelError(f"rope scaling {rope_type!r} needs factor >= 1, got {factor!r}")
    original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if rope_type == "yarn":
        return theta, parse_yarn(params, float(factor), int(original or max_positions))
    if rope_type != "llama3":
        return theta, RopeScaling(rope_type, float(factor))
    return theta, RopeScaling(
        "llama3",
        float(factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original or max_positions),
    )


def parse_yarn(params: dict[str, Any], factor: float, original: int) -> RopeScaling:
    """YaRN, resolved as transformers' `_compute_yarn_parameters` does: `attention_factor` defaults to
    0.1 ln(factor) + 1 (or the ratio of the two mscale terms when `mscale` and `mscale_all_dim` are
    given), beta_fast / beta_slow to 32 / 1 (also when null), `truncate` to true."""
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)
    values = {"attention_factor": attention, "beta_fast": params.get("beta_fast") or 32,
              "beta_slow": params.get("beta_slow") or 1}
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ModelError(f"yarn {name} must be a positive number, got {value!r}")
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ModelError(f"yarn truncate must be true or false, got {truncate!r}")
    return RopeScaling("yarn", factor, original_max_position_embeddings=original,
                       attention_factor=float(values["attention_factor"]),
                       beta_fast=float(values["beta_fast"]), beta_slow=float(values["beta_slow"]),
                       truncate=truncate)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def parse_longrope(cfg: dict[str, Any], params: dict[str, Any], max_positions: int) -> RopeScaling:
    """Phi-3's longrope, resolved as transformers' `_compute_longrope_parameters` does: `factor`
    defaults to max_position_embeddings / original_max_position_embeddings (the top-level key wins
    over the block's), `attention_factor` to sqrt(1 + ln(factor) / ln(original)) above factor 1."""
    original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original < 2:
        raise ModelError(f"longrope needs original_max_position_embeddings >= 2, got {original!r}")
    factors = {}
    for name in ("short_factor", "long_factor"):
        value = params.get(name)
        if not isinstance(value, list) or not all(isinstance(x, (int, float)) and x > 0 for x in value):
            raise ModelError(f"longrope {name} must be a list of positive numbers, got {value!r}")
        factors[name] = tuple(float(x) for x in value)
    factor = params.get("factor")
    factor = max_positions / original if factor is None else factor
    attention = params.get("attention_factor")
    for name, value in (("factor", factor), ("attention_factor", attention)):
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ModelError(f"longrope {name} must be a positive number, got {value!r}")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling("longrope", float(factor), original_max_position_embeddings=original,
                       attention_factor=float(attention), **factors)


def scaling_block(args: ModelArgs) -> dict[str, Any] | None:
    """`args.rope_scaling` as config.json's scaling keys (None: no scaling)."""
    scaling = None
    if args.rope_scaling is not None:
        scaling = {"rope_type": args.rope_scaling.rope_type, "factor": args.rope_scaling.factor}
        if args.rope_scaling.rope_type == "llama3":
            scaling.update(
                low_freq_factor=args.rope_scaling.low_freq_factor,
                high_freq_factor=args.rope_scaling.high_freq_factor,
                original_max_position_embeddings=args.rope_scaling.original_max_position_embeddings,
            )
        if args.rope_scaling.rope_type == "yarn":
            scaling.update(
                original_max_position_embeddings=args.rope_scaling.original_max_position_embeddings,
                attention_factor=args.rope_scaling.attention_factor,
                beta_fast=args.rope_scaling.beta_fast,
                beta_slow=args.rope_scaling.beta_slow,
                truncate=args.rope_scaling.truncate,
            )
        if args.rope_scaling.rope_type == "longrope":
            original = args.rope_scaling.original_max_position_embeddings
            scaling.update(
                short_factor=list(args.rope_scaling.short_factor),
                long_factor=list(args.rope_scaling.long_factor),
                attention_factor=args.rope_scaling.attention_factor,
                original_max_position_embeddings=original,
            )
    return scaling


def write_rope(args: ModelArgs, cfg: dict[str, Any]) -> None:
    """Put `args`' RoPE into config.json dict `cfg`, in the layout `cfg` already uses."""
    scaling = scaling_block(args)
    if "rope_parameters" in cfg:  # transformers >= 5 layout: one block holding theta too
        cfg["rope_parameters"] = {
            "rope_type": "default",
            **(scaling or {}),
            "rope_theta": args.rope_theta,
        }
        cfg.pop("rope_scaling", None)
        cfg.pop("rope_theta", None)
    else:  # the layout every transformers version reads
        cfg.update(rope_theta=args.rope_theta, rope_scaling=scaling)
