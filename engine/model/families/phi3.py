"""Phi-3 / Phi-3.5 / Phi-4 (transformers' Phi3ForCausalLM): the shared decoder with q/k/v fused in one
`qkv_proj` and gate/up in one `gate_up_proj` (its checkpoint layout, kept in the model), an optional
partial rotary factor (Phi-4-mini rotates the leading 3/4 of each head), longrope scaling (`su` and
`yarn` are longrope to transformers' Phi-3) and one sliding window on every layer."""

from __future__ import annotations

from typing import Any

from packtune.errors import ModelError
from packtune.model.config import ModelArgs
from packtune.model.families.decoder import check_options, decoder_args, decoder_config, uniform_window
from packtune.model.families.family import Family, HFConfig, HFModules, register
from packtune.model.llama import LlamaForCausalLM
from packtune.model.rope_config import (
    parse_longrope,
    parse_rope,
    partial_rotary_factor,
    rope_block,
    rope_type,
)


def parse(c: HFConfig) -> ModelArgs:
    check_options(c, "phi3")
    max_positions = c.get("max_position_embeddings")
    kind = rope_type(c.raw)
    if kind in ("su", "yarn", "longrope"):
        params = rope_block(c.raw)
        theta = float(params.get("rope_theta", c.raw.get("rope_theta", 10000.0)))
        rope = dict(rope_theta=theta, rope_scaling=parse_longrope(c.raw, params, max_positions))
    elif kind == "default":
        theta, scaling = parse_rope(c.raw, max_positions)
        rope = dict(rope_theta=theta, rope_scaling=scaling)
    else:
        raise ModelError(
            f"rope scaling type {kind!r} is not supported for phi3 (only default and longrope / su)")
    return decoder_args(c, "phi3", fused_projections=True, partial_rotary_factor=partial_rotary_factor(c.raw),
                        **rope, **uniform_window(c, "phi3"))


def write(args: ModelArgs) -> dict[str, Any]:
    cfg = decoder_config(args, sliding_window=args.sliding_window,
                         partial_rotary_factor=args.partial_rotary_factor)
    if "rope_parameters" in cfg:
        cfg["rope_parameters"]["partial_rotary_factor"] = args.partial_rotary_factor
    if args.rope_scaling is not None and args.rope_scaling.rope_type == "longrope":
        # transformers' Phi-3 reads the top-level key first
        cfg["original_max_position_embeddings"] = args.rope_scaling.original_max_position_embeddings
    return cfg


FAMILY = register(Family(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    parse=parse,
    write=write,
    build=LlamaForCausalLM,
    lora_targets=("o_proj", "qkv_proj", "gate_up_proj", "down_proj"),  # module order, as transformers
    defaults={"max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 32000,
              "pad_token_id": 32000, "rms_norm_eps": 1e-5, "sliding_window": None},
    hf=HFModules("Phi3", fused_projections=True, window_per_layer=False),
))
