"""OLMoE (transformers' OlmoeForCausalLM): attention with RMSNorm of q and k over the whole projection
(OLMo 2's) and q, k, v clamped to [-clip_qkv, clip_qkv] when set, no sliding window, over sparse
blocks of `num_experts` experts of width `intermediate_size` (64, top 8 in OLMoE-1B-7B), a
softmax-then-top-k router (renormalised with `norm_topk_prob`)."""

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
    check_options(c, "olmoe", allowed=("num_experts",))
    hidden, heads = c.required("hidden_size"), c.required("num_attention_heads")
    if c.get("head_dim") not in (None, hidden // heads):  # its q norm is hidden_size wide
        raise ModelError(f"head_dim={c.get('head_dim')} is not supported for olmoe (only hidden_size / "
                         f"num_attention_heads = {hidden // heads})")
    clip = c.optional_float("clip_qkv")
    if clip is not None and clip <= 0:
        raise ModelError(f"clip_qkv must be positive, got {clip}")
    bias = bool(c.get("attention_bias", False))
    return decoder_args(c, "olmoe", qkv_bias=bias, o_bias=bias, qk_norm="projection", clip_qkv=clip,
                        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
                        **router_options(c, "olmoe", "num_experts", "intermediate_size"))


def write(args: ModelArgs) -> dict:
    return decoder_config(args, attention_bias=args.qkv_bias, clip_qkv=args.clip_qkv,
                          norm_topk_prob=args.norm_topk_prob, **router_config(args, "num_experts"))


FAMILY = register(Family(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
    parse=parse,
    write=write,
    build=lambda args: MoEForCausalLM(args, BlockNames(router="gate")),
    lora_targets=(*ATTENTION_LINEARS, *EXPERT_TARGETS),
    defaults={"max_position_embeddings": 4096, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279,
              "rms_norm_eps": 1e-5, "num_experts": 64, "num_experts_per_tok": 8,
              "router_aux_loss_coef": 0.01},
    flops=moe_flops,
    hf_refusal="transformers' MoE forward adds the router's load-balancing loss to its loss "
               "(output_router_logits) and runs the experts through its own experts implementation; "
               "apply_packtune's fused-loss forward would drop that loss, and its attention forward has "
               "no clip_qkv",
    stored=stored_experts,
))
