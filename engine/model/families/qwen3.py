"""Qwen3 (transformers' Qwen3ForCausalLM): the shared decoder with per-head RMSNorm of q and k before
RoPE, optional attention biases, and Qwen2's sliding-window layout."""

from __future__ import annotations

from packtune.model.config import ModelArgs
from packtune.model.families.decoder import (
    DECODER_LINEARS,
    check_options,
    decoder_args,
    decoder_config,
    qwen_windows,
)
from packtune.model.families.family import Family, HFConfig, HFModules, register
from packtune.model.llama import LlamaForCausalLM


def parse(c: HFConfig) -> ModelArgs:
    check_options(c, "qwen3")
    bias = bool(c.get("attention_bias", False))
    return decoder_args(c, "qwen3", qkv_bias=bias, o_bias=bias, qk_norm="head", **qwen_windows(c))


def write(args: ModelArgs) -> dict:
    return decoder_config(args, attention_bias=args.qkv_bias,
                          use_sliding_window=args.sliding_window is not None,
                          sliding_window=args.sliding_window, layer_types=list(args.layer_types))


FAMILY = register(Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    parse=parse,
    write=write,
    build=LlamaForCausalLM,
    lora_targets=DECODER_LINEARS,
    defaults={"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
              "num_key_value_heads": 32, "head_dim": 128, "sliding_window": 4096, "max_window_layers": 28},
    hf=HFModules("Qwen3", qk_norm="head"),
))
