"""Gemma 2 and Gemma 3 (text) (transformers' Gemma2ForCausalLM, Gemma3ForCausalLM): the shared decoder
with embeddings scaled by sqrt(hidden), RMSNorm by 1 + weight, four norms per block ("sandwich"),
tanh-GELU gating, attention scaled by query_pre_attn_scalar ** -0.5, and alternating sliding-window
layers. Gemma 2 caps attention and output logits; Gemma 3 norms q and k per head and gives its
sliding-window layers a RoPE base of their own (two RoPE blocks in config.json)."""

from __future__ import annotations

from typing import Any

from packtune.errors import ModelError
from packtune.model.config import ModelArgs
from packtune.model.families.decoder import (
    DECODER_LINEARS,
    check_options,
    decoder_args,
    decoder_config,
    layer_types,
)
from packtune.model.families.family import Family, HFConfig, HFModules, register
from packtune.model.llama import LlamaForCausalLM
from packtune.model.rope_config import parse_rope, scaling_block

DEFAULTS: dict[str, Any] = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "num_key_value_heads": 4,
                            "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                            "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096}
"""What Gemma2Config and Gemma3TextConfig share."""


def _windows(c: HFConfig, period: int) -> dict[str, Any]:
    """The window and per-layer attention types: one global layer every `period` (Gemma 2: 2, from
    layer 0 local; Gemma 3: `sliding_window_pattern`, 5 local to 1 global) unless `layer_types` lists them."""
    layers = c.required("num_hidden_layers")
    raw = c.raw.get("layer_types")
    if raw is None:
        raw = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    types = layer_types(raw, layers)
    window = c.get("sliding_window")
    if window is None and "sliding_attention" in types:
        raise ModelError("sliding_window is required by layer_types with sliding_attention layers")
    return dict(sliding_window=window, layer_types=types)


def _gemma_args(c: HFConfig, model_type: str, **options: Any) -> ModelArgs:
    activation = check_options(c, model_type, "hidden_activation", ("gelu_pytorch_tanh",))
    return decoder_args(
        c, model_type, hidden_act=activation, qkv_bias=bool(c.get("attention_bias", False)),
        o_bias=bool(c.get("attention_bias", False)), norm_offset=1.0, scale_embeddings=True,
        norm_placement="sandwich", attention_scale=c.get("query_pre_attn_scalar") ** -0.5,
        attn_logit_softcapping=c.optional_float("attn_logit_softcapping"),
        final_logit_softcapping=c.optional_float("final_logit_softcapping"), **options)


def _gemma_config(args: ModelArgs, **keys: Any) -> dict[str, Any]:
    cfg = decoder_config(
        args, hidden_activation=args.hidden_act, attention_bias=args.qkv_bias,
        sliding_window=args.sliding_window, layer_types=list(args.layer_types),
        attn_logit_softcapping=args.attn_logit_softcapping,
        final_logit_softcapping=args.final_logit_softcapping,
        query_pre_attn_scalar=args.hf_config.get("query_pre_attn_scalar", args.attention_scale**-2),
        **keys)
    cfg.pop("hidden_act", None)
    return cfg


def parse_gemma2(c: HFConfig) -> ModelArgs:
    return _gemma_args(c, "gemma2", **_windows(c, 2))


def parse_gemma3(c: HFConfig) -> ModelArgs:
    """Gemma 3's two RoPE blocks: global layers (any supported scaling) and local ones (unscaled).

    transformers 5 writes `rope_parameters` = {"full_attention": {...}, "sliding_attention": {...}};
    older files have `rope_theta`, `rope_scaling` (global) and `rope_local_base_freq`.
    """
    params = c.raw.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full = dict(c.raw.get("rope_scaling") or {})
        local = {"rope_theta": c.get("rope_local_base_freq")}
    full.setdefault("rope_theta", c.get("rope_theta"))
    local.setdefault("rope_theta", c.get("rope_local_base_freq"))
    for block in (full, local):
        if block.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
            raise ModelError(
                f"partial_rotary_factor={block['partial_rotary_factor']} is not supported for gemma3_text")
    max_positions = c.get("max_position_embeddings")
    theta, scaling = parse_rope({"rope_parameters": full}, max_positions)
    local_theta, local_scaling = parse_rope({"rope_parameters": local}, max_positions)
    if local_scaling is not None:
        raise ModelError(
            f"rope scaling {local_scaling.rope_type!r} on the sliding_attention layers is not supported")
    return _gemma_args(c, "gemma3_text", qk_norm="head", rope_theta=theta, rope_scaling=scaling,
                       local_rope_theta=local_theta, **_windows(c, c.get("sliding_window_pattern")))


def write_gemma3(args: ModelArgs) -> dict[str, Any]:
    cfg = _gemma_config(args)
    full = {"rope_type": "default", **(scaling_block(args) or {}), "rope_theta": args.rope_theta}
    cfg["rope_parameters"] = {  # one block per layer type
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": args.local_rope_theta},
    }
    for key in ("rope_scaling", "rope_theta", "rope_local_base_freq"):
        cfg.pop(key, None)
    return cfg


GEMMA2 = register(Family(
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    parse=parse_gemma2,
    write=_gemma_config,
    build=LlamaForCausalLM,
    lora_targets=DECODER_LINEARS,
    defaults={**DEFAULTS, "max_position_embeddings": 8192, "final_logit_softcapping": 30.0,
              "attn_logit_softcapping": 50.0},
    hf=HFModules("Gemma2", activation="gelu_tanh", activation_key="hidden_activation", norm_offset=1.0,
                 attention_softcap=True),
))
GEMMA3 = register(Family(
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    parse=parse_gemma3,
    write=write_gemma3,
    build=LlamaForCausalLM,
    lora_targets=DECODER_LINEARS,
    defaults={**DEFAULTS, "max_position_embeddings": 131072, "rope_theta": 1_000_000.0,
              "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6},
    hf=HFModules("Gemma3", activation="gelu_tanh", activation_key="hidden_activation", norm_offset=1.0,
                 qk_norm="head"),
))
