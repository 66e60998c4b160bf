"""OLMo 2 (transformers' Olmo2ForCausalLM): the shared decoder with norms after each sublayer instead of
before it (each block adds post_attention_layernorm(attention(x)) and post_feedforward_layernorm(mlp(h))
to the residual, and nothing norms the inputs), and RMSNorm of q and k over the whole projection
(all heads together) before RoPE."""

from __future__ import annotations

from packtune.model.config import ModelArgs
from packtune.model.families.decoder import DECODER_LINEARS, check_options, decoder_args, decoder_config
from packtune.model.families.family import Family, HFConfig, HFModules, register
from packtune.model.llama import LlamaForCausalLM


def parse(c: HFConfig) -> ModelArgs:
    check_options(c, "olmo2")
    bias = bool(c.get("attention_bias", False))
    return decoder_args(c, "olmo2", qkv_bias=bias, o_bias=bias, qk_norm="projection", norm_placement="post")


def write(args: ModelArgs) -> dict:
    return decoder_config(args, attention_bias=args.qkv_bias)


FAMILY = register(Family(
    model_type="olmo2",
    architecture="Olmo2ForCausalLM",
    parse=parse,
    write=write,
    build=LlamaForCausalLM,
    lora_targets=DECODER_LINEARS,
    defaults={"max_position_embeddings": 2048, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279,
              "rms_norm_eps": 1e-5},
    hf=HFModules("Olmo2", qk_norm="projection"),
))
