"""Granite 3 (transformers' GraniteForCausalLM): the shared decoder with four scalars of its own: the
embeddings times `embedding_multiplier`, each sublayer's output times `residual_multiplier` before it
joins the residual, attention logits scaled by `attention_multiplier` (instead of head_dim ** -0.5),
and the output logits divided by `logits_scaling`."""

from __future__ import annotations

from packtune.model.config import ModelArgs
from packtune.model.families.decoder import DECODER_LINEARS, check_options, decoder_args, decoder_config
from packtune.model.families.family import Family, HFConfig, register
from packtune.model.llama import LlamaForCausalLM


def parse(c: HFConfig) -> ModelArgs:
    check_options(c, "granite")
    bias = bool(c.get("attention_bias", False))
    return decoder_args(
        c, "granite", qkv_bias=bias, o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)),
        embedding_multiplier=float(c.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(c.get("residual_multiplier", 1.0)),
        attention_scale=float(c.get("attention_multiplier", 1.0)),
        logits_scaling=float(c.get("logits_scaling", 1.0)))


def write(args: ModelArgs) -> dict:
    return decoder_config(args, attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias,
                          embedding_multiplier=args.embedding_multiplier,
                          residual_multiplier=args.residual_multiplier,
                          attention_multiplier=args.attention_scale, logits_scaling=args.logits_scaling)


FAMILY = register(Family(
    model_type="granite",
    architecture="GraniteForCausalLM",
    parse=parse,
    write=write,
    build=LlamaForCausalLM,
    lora_targets=DECODER_LINEARS,
    defaults={"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-6},
    hf_refusal="transformers' Granite multiplies the embeddings and divides the logits outside the modules "
               "apply_packtune replaces (embedding_multiplier, logits_scaling), which its packed forward and "
               "fused loss would skip",
))
