"""What the mixture-of-experts families (qwen3_moe, mixtral, olmoe, gpt_oss) share: their config.json
keys for the experts and the router, where a checkpoint keeps the experts (transformers 5's fused
3-D tensors, the older one-Linear-per-expert layout stacked on load, gpt-oss's MXFP4 blocks
dequantised on load), their LoRA targets and their FLOP count."""

from __future__ import annotations

import re
from typing import Any

import torch

from packtune.errors import ModelError
from packtune.model import mxfp4
from packtune.model.config import ModelArgs
from packtune.model.families.decoder import decoder_flops
from packtune.model.families.family import HFConfig, StoredTensor

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")
"""LoRA's names for the experts' 3-D weights (PEFT's `target_parameters`)."""


def router_options(c: HFConfig, model_type: str, experts_key: str, expert_width_key: str) -> dict[str, Any]:
    """ModelArgs fields of the experts and the router (shapes checked)."""
    experts = c.raw.get(experts_key, c.raw.get("num_local_experts", c.defaults.get(experts_key)))
    top_k = c.get("num_experts_per_tok")
    for key, value in (("num_experts", experts), ("num_experts_per_tok", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelError(f"{key} must be a positive integer, got {value!r}")
    if top_k > experts:
        raise ModelError(f"num_experts_per_tok={top_k} is more than the {experts} experts")
    return dict(num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=c.required(expert_width_key),
                router_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)))


def router_config(args: ModelArgs, experts_key: str) -> dict[str, Any]:
    return {experts_key: args.num_experts, "num_experts_per_tok": args.num_experts_per_tok,
            "router_aux_loss_coef": args.router_aux_loss_coef}


def moe_flops(args: ModelArgs, seq_len: int) -> int:
    """The decoders' count (families/decoder.py) with each sparse layer's MLP replaced by what a token
    passes through there: the router and its k experts (with gpt-oss's biases)."""
    h = args.hidden_size
    sparse = sum(args.sparse(i) for i in range(args.num_hidden_layers))
    dense_mlp = 3 * h * args.intermediate_size + (2 * args.intermediate_size + h) * args.mlp_bias
    expert = 3 * h * args.moe_intermediate_size
    if args.expert_format == "gpt_oss":
        expert += 2 * args.moe_intermediate_size + h
    routed = args.num_experts_per_tok * expert + h * args.num_experts + args.num_experts * args.router_bias
    sinks = args.num_hidden_layers * args.num_attention_heads * args.attention_sinks
    return decoder_flops(args, seq_len) + 6 * (sparse * (routed - dense_mlp) + sinks)


_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.(?:mlp|block_sparse_moe)\.experts)\.(?P<expert>\d+)\."
                         r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_KIND = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def stored_experts(names: list[str]) -> dict[str, str | StoredTensor]:
    """Where a checkpoint of an MoE family keeps the experts, when not as transformers 5's fused
    tensors: one Linear per expert (`experts.{e}.gate_proj` / `up_proj` / `down_proj`, Mixtral's
    `block_sparse_moe.experts.{e}.w1` / `w3` / `w2`), stacked on load into `gate_up_proj` [E, 2I, H]
    (gate rows first) and `down_proj` [E, H, I]; gpt-oss's MXFP4 `<name>_blocks` / `<name>_scales`,
    dequantised. Mixtral's older `block_sparse_moe.` prefix reads as `mlp.`."""
    layout: dict[str, str | StoredTensor] = {}
    groups: dict[str, dict[str, dict[int, str]]] = {}
    for name in names:
        match = _PER_EXPERT.match(name)
        if match:
            kinds = groups.setdefault(match["prefix"].replace(".block_sparse_moe.", ".mlp."), {})
            kinds.setdefault(_KIND[match["proj"]], {})[int(match["expert"])] = name
        elif name.endswith("_blocks") and f"{name.removesuffix('_blocks')}_scales" in names:
            base = name.removesuffix("_blocks")
            layout[base] = StoredTensor((name, f"{base}_scales"), lambda p: mxfp4.dequantize(*p),
                                        lambda s: mxfp4.dequantized_shape(*s))
        elif ".block_sparse_moe." in name:
            layout[name.replace(".block_sparse_moe.", ".mlp.")] = name
    for prefix, kinds in groups.items():
        gates, ups, downs = ([names[e] for e in sorted(names)]
                             for names in (kinds.get(k, {}) for k in ("gate", "up", "down")))
        if len(gates) == len(ups):
            layout[f"{prefix}.gate_up_proj"] = StoredTensor((*gates, *ups), _stack_gate_up, _gate_up_shape)
        layout[f"{prefix}.down_proj"] = StoredTensor(tuple(downs), torch.stack, _stacked_shape)
    return layout


def _stacked_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    return (len(shapes), *shapes[0]) if shapes and len(set(shapes)) == 1 else (-1,)


def _stack_gate_up(pieces: list[torch.Tensor]) -> torch.Tensor:
    half = len(pieces) // 2
    return torch.cat([torch.stack(pieces[:half]), torch.stack(pieces[half:])], dim=1)


def _gate_up_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    stacked = _stacked_shape(shapes)  # [2E, I, H]: the gates, then the ups
    return (-1,) if stacked == (-1,) else (stacked[0] // 2, 2 * stacked[1], stacked[2])
