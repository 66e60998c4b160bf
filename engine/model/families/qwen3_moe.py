"""Qwen3-MoE (transformers' Qwen3MoeForCausalLM): Qwen3's attention (per-head q/k RMSNorm, optional
biases, one sliding window on every layer with `use_sliding_window`) over sparse blocks of
`num_experts` experts of width `moe_intermediate_size`, a softmax-then-top-k router (renormalised
with `norm_topk_prob`), dense MLPs of `intermediate_size` on `mlp_only_layers` and between sparse
layers when `decoder_sparse_step` > 1. transformers builds a block's experts before its router."""

from __future__ import annotations

from packtune.errors import ModelError
from packtune.model.config import ModelArgs
from packtune.model.families.decoder import check_options, decoder_args, decoder_config
from packtune.model.families.experts import (
    ATTENTION_LINEARS,
    EXPERT_TARGETS,
    moe_flops,
    router_config,
    router_options,
    stored_experts,
)
from packtune.model.families.family import Family, HFConfig, register
from packtune.model.moe import BlockNames, MoEForCausalLM


def parse(c: HFConfig) -> ModelArgs:
    check_options(c, "qwen3_moe", allowed=("moe_intermediate_size", "num_experts", "num_local_experts"))
    if c.raw.get("layer_types"):
        raise ModelError("layer_types on a qwen3_moe config (alternating attention) is not supported")
    layers, step = c.required("num_hidden_layers"), c.get("decoder_sparse_step", 1)
    dense = c.get("mlp_only_layers") or []
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ModelError(f"decoder_sparse_step must be a positive integer, got {step!r}")
    if not isinstance(dense, list) or not all(isinstance(i, int) and 0 <= i < layers for i in dense):
        raise ModelError(f"mlp_only_layers must list layer indices below {layers}, got {dense!r}")
    bias = bool(c.get("attention_bias", False))
    window = c.get("sliding_window") if c.get("use_sliding_window", False) else None
    return decoder_args(c, "qwen3_moe", qkv_bias=bias, o_bias=bias, qk_norm="head", sliding_window=window,
                        norm_topk_prob=bool(c.get("norm_topk_prob", False)), decoder_sparse_step=step,
                        mlp_only_layers=tuple(dense),
                        **router_options(c, "qwen3_moe", "num_experts", "moe_intermediate_size"))


def write(args: ModelArgs) -> dict:
    key = "num_local_experts" if "num_local_experts" in args.hf_config else "num_experts"
    window = args.sliding_window
    return decoder_config(args, attention_bias=args.qkv_bias, use_sliding_window=window is not None,
                          sliding_window=window, moe_intermediate_size=args.moe_intermediate_size,
                          norm_topk_prob=args.norm_topk_prob, decoder_sparse_step=args.decoder_sparse_step,
                          mlp_only_layers=list(args.mlp_only_layers), **router_config(args, key))


FAMILY = register(Family(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    parse=parse,
    write=write,
    build=lambda args: MoEForCausalLM(args, BlockNames(router="gate", experts_first=True)),
    lora_targets=(*ATTENTION_LINEARS, *EXPERT_TARGETS, "gate_proj", "up_proj", "down_proj"),  # dense MLP
    defaults={"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
              "num_key_value_heads": 4, "sliding_window": 4096, "num_experts": 128, "num_experts_per_tok": 8,
              "moe_intermediate_size": 768, "router_aux_loss_coef": 0.001},
    flops=moe_flops,
    hf_refusal="transformers' MoE forward adds the router's load-balancing loss to its loss "
               "(output_router_logits) and runs the experts through its own experts implementation; "
               "apply_packtune's fused-loss forward would drop that loss",
    stored=stored_experts,
))
