"""Mixtral (transformers' MixtralForCausalLM): Mistral's attention (one sliding window on every layer
when `sliding_window` is set, no biases) over sparse blocks of `num_local_experts` experts of width
`intermediate_size`, each token routed to its top 2 by softmax probability, renormalised. Older
checkpoints keep the experts per expert under `block_sparse_moe.experts.{e}.w1` / `w3` / `w2`."""

from __future__ import annotations

from packtune.errors import ModelError
from packtune.model.config import ModelArgs
from packtune.model.families.decoder import check_options, decoder_args, decoder_config, uniform_window
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
    check_options(c, "mixtral", allowed=("num_local_experts",))
    if c.get("router_jitter_noise", 0.0):
        raise ModelError(f"router_jitter_noise={c.get('router_jitter_noise')} is not supported (only 0: "
                         "packtune trains without noise on the router's input)")
    return decoder_args(c, "mixtral", norm_topk_prob=True, **uniform_window(c, "mixtral"),
                        **router_options(c, "mixtral", "num_local_experts", "intermediate_size"))


def write(args: ModelArgs) -> dict:
    return decoder_config(args, sliding_window=args.sliding_window, router_jitter_noise=0.0,
                          **router_config(args, "num_local_experts"))


FAMILY = register(Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    parse=parse,
    write=write,
    build=lambda args: MoEForCausalLM(args, BlockNames(router="gate")),
    lora_targets=(*ATTENTION_LINEARS, *EXPERT_TARGETS),
    defaults={"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2,
              "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
              "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001},
    flops=moe_flops,
    hf_refusal="transformers' MoE forward adds the router's load-balancing loss to its loss "
               "(output_router_logits) and runs the experts through its own experts implementation; "
               "apply_packtune's fused-loss forward would drop that loss",
    stored=stored_experts,
))
