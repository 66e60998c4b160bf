"""Mistral (transformers' MistralForCausalLM): the shared decoder with one sliding window on every
layer when `sliding_window` is set."""

from __future__ import annotations

from packtune.model.config import ModelArgs
from packtune.model.families.decoder import (
    DECODER_LINEARS,
    check_options,
    decoder_args,
    decoder_config,
    uniform_window,
)
from packtune.model.families.family import Family, HFConfig, HFModules, register
from packtune.model.llama import LlamaForCausalLM


def parse(c: HFConfig) -> ModelArgs:
    check_options(c, "mistral")
    return decoder_args(c, "mistral", **uniform_window(c, "mistral"))


def write(args: ModelArgs) -> dict:
    return decoder_config(args, sliding_window=args.sliding_window)


FAMILY = register(Family(
    model_type="mistral",
    architecture="MistralForCausalLM",
    parse=parse,
    write=write,
    build=LlamaForCausalLM,
    lora_targets=DECODER_LINEARS,
    defaults={"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2,
              "num_key_value_heads": 8, "sliding_window": 4096},
    hf=HFModules("Mistral", window_per_layer=False),
))
