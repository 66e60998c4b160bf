"""gpt-oss (transformers' GptOssForCausalLM): attention with biases and a learned sink logit per head
(`self_attn.sinks`), sliding-window and full layers alternating (`layer_types`, window 128), YaRN
RoPE; sparse blocks whose router has a bias and takes the top k logits, then the softmax over those,
and whose experts are stored in-by-out with gate and up interleaved, biases, and a SwiGLU clamped
at `swiglu_limit` with gain `swiglu_alpha` (kernels/moe.py's `gpt_oss_format`). Released checkpoints
keep the experts in MXFP4 (`quantization_config` quant_method "mxfp4"): they are dequantised on
load, and an export writes them dense, without the quantization_config."""

from __future__ import annotations

from typing import Any

from packtune.errors import ModelError
from packtune.model.config import ModelArgs
from packtune.model.families.decoder import check_options, decoder_args, decoder_config, layer_types
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
from packtune.model.rope_config import parse_rope, rope_block, whole_heads

DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
"""transformers' GptOssConfig when config.json names no RoPE block."""


def parse(c: HFConfig) -> ModelArgs:
    check_options(c, "gpt_oss", allowed=("num_local_experts", "quantization_config"))
    quantization = c.raw.get("quantization_config")
    if quantization and quantization.get("quant_method") != "mxfp4":
        raise ModelError(f"quantization_config with quant_method {quantization.get('quant_method')!r} is not "
                         "supported for gpt_oss (only mxfp4, whose experts are dequantised on load)")
    layers = c.required("num_hidden_layers")
    raw = c.raw.get("layer_types")
    if raw is None:  # transformers' default: sliding, full, sliding, ...
        raw = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    whole_heads(c.raw, "gpt_oss")
    block = rope_block(c.raw) or dict(DEFAULT_ROPE)
    theta, scaling = parse_rope({"rope_theta": c.get("rope_theta", 150000.0), "rope_parameters": block},
                                c.get("max_position_embeddings"))
    bias = bool(c.get("attention_bias", True))
    return decoder_args(c, "gpt_oss", qkv_bias=bias, o_bias=bias, attention_sinks=True, rope_theta=theta,
                        rope_scaling=scaling, sliding_window=c.get("sliding_window"),
                        layer_types=layer_types(raw, layers), router="topk_softmax", router_bias=True,
                        expert_format="gpt_oss", swiglu_alpha=float(c.get("swiglu_alpha", 1.702)),
                        swiglu_limit=float(c.get("swiglu_limit", 7.0)),
                        **router_options(c, "gpt_oss", "num_local_experts", "intermediate_size"))


def write(args: ModelArgs) -> dict[str, Any]:
    cfg = decoder_config(args, attention_bias=args.qkv_bias, sliding_window=args.sliding_window,
                         layer_types=list(args.layer_types), swiglu_alpha=args.swiglu_alpha,
                         swiglu_limit=args.swiglu_limit, **router_config(args, "num_local_experts"))
    cfg.pop("quantization_config", None)  # the export holds the experts dense
    return cfg


FAMILY = register(Family(
    model_type="gpt_oss",
    architecture="GptOssForCausalLM",
    parse=parse,
    write=write,
    build=lambda args: MoEForCausalLM(args, BlockNames(router="router")),
    lora_targets=(*ATTENTION_LINEARS, *EXPERT_TARGETS),
    defaults={"max_position_embeddings": 131072, "bos_token_id": None, "eos_token_id": None, "head_dim": 64,
              "num_key_value_heads": 8, "sliding_window": 128, "rms_norm_eps": 1e-5, "num_local_experts": 128,
              "num_experts_per_tok": 4, "router_aux_loss_coef": 0.001},
    flops=moe_flops,
    hf_refusal="transformers' MoE forward adds the router's load-balancing loss to its loss "
               "(output_router_logits) and runs the experts through its own experts implementation; "
               "apply_packtune's fused-loss forward would drop that loss, and its attention forward has "
               "no attention sinks",
    stored=stored_experts,
))
