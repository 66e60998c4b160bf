"""Qwen2 / Qwen2.5 (transformers' Qwen2ForCausalLM): the shared decoder with biases on q, k and v, and
sliding windows on the upper layers only when `use_sliding_window` is set."""

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
    check_options(c, "qwen2")
    return decoder_args(c, "qwen2", qkv_bias=True, **qwen_windows(c))


def write(args: ModelArgs) -> dict:
    return decoder_config(args, use_sliding_window=args.sliding_window is not None,
                          sliding_window=args.sliding_window, layer_types=list(args.layer_types))


FAMILY = register(Family(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    parse=parse,
    write=write,
    build=LlamaForCausalLM,
    lora_targets=DECODER_LINEARS,
    defaults={"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
              "num_key_value_heads": 32, "sliding_window": 4096, "max_window_layers": 28},
    hf=HFModules("Qwen2"),
))
