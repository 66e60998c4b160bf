"""Llama 1 / 2 / 3 / 3.x (transformers' LlamaForCausalLM): the shared decoder with its defaults, optional
attention and MLP biases, and llama3 / linear / dynamic RoPE scaling. No sliding window."""

from __future__ import annotations

from packtune.model.config import ModelArgs
from packtune.model.families.decoder import DECODER_LINEARS, check_options, decoder_args, decoder_config
from packtune.model.families.family import Family, HFConfig, HFModules, register
from packtune.model.llama import LlamaForCausalLM


def parse(c: HFConfig) -> ModelArgs:
    check_options(c, "llama")
    bias = bool(c.get("attention_bias", False))
    return decoder_args(c, "llama", qkv_bias=bias, o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)))


def write(args: ModelArgs) -> dict:
    return decoder_config(args, attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias)


FAMILY = register(Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    parse=parse,
    write=write,
    build=LlamaForCausalLM,
    lora_targets=DECODER_LINEARS,
    defaults={"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    hf=HFModules("Llama"),
))
