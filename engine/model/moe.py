"""Mixture-of-experts decoders (Qwen3-MoE, Mixtral, OLMoE, gpt-oss): the shared decoder of llama.py
with a block of experts in place of the MLP on the sparse layers, in transformers 5's layout.

A sparse block is a router and its experts. The router scores each token against every expert
(`gate.weight` [E, H], gpt-oss's `router.weight` and `router.bias`) and keeps the top k: Qwen3-MoE,
OLMoE and Mixtral take the softmax over all experts, then the k largest probabilities (renormalised
to sum to 1 with `norm_topk_prob`, always for Mixtral); gpt-oss takes the k largest logits, then
the softmax over those. The experts are 3-D parameters as transformers 5 stores them
(`experts.gate_up_proj`, `experts.down_proj`, gpt-oss's biases; kernels/moe.py's docstring gives
both layouts), so FSDP2 shards them on dim 0 (the experts) and checkpoints name them as
transformers does; `packtune.kernels.moe_experts` runs them.

Each sparse block also returns what the load-balancing loss and the load metrics need, over the
tokens each weighted by its `multiplicity`, the samples it stands for (a padded batch's padding 0; a
prompt that a preference pair's two sides share, packed once, 2: the sums of the unshared row):
`RouterLoad`. The blocks return it as an
output (not a side effect), so FSDP's hooks and activation checkpointing see it like the hidden
states; the model keeps the last forward's loads in `router_loads`, which packtune.loss reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from packtune.kernels import PackedLayout
from packtune.kernels.moe import SWIGLU, gpt_oss_format, moe_experts
from packtune.model.config import ModelArgs
from packtune.model.llama import MLP, AttentionInputs, DecoderLayer, LlamaForCausalLM


class RouterLoad(NamedTuple):
    """One sparse layer's routing over a batch's tokens, each counted `multiplicity` times."""

    counts: torch.Tensor
    """[E] (token, expert) pairs routed to each expert (no gradient)."""
    probs: torch.Tensor
    """[E] the router's softmax probabilities summed over the tokens (differentiable)."""
    z: torch.Tensor
    """[] the sum over the tokens of logsumexp(router logits) ** 2 (differentiable)."""
    tokens: torch.Tensor
    """[] how many tokens."""


def router_losses(loads: list[RouterLoad]) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) over every sparse layer's loads.

    The load-balancing loss is transformers' `load_balancing_loss_func` (Switch Transformer's,
    over top-k assignments): the layers pooled, E * sum_e f_e P_e with f_e the share of tokens
    routed to expert e (k per token) and P_e its mean router probability, each summed over all
    layers and divided by layers x tokens. The z-loss (ST-MoE) is the mean over layers and tokens
    of logsumexp(logits) ** 2."""
    counts = torch.stack([load.counts for load in loads]).sum(0)
    probs = torch.stack([load.probs for load in loads]).sum(0)
    rows = torch.stack([load.tokens for load in loads]).sum()
    aux = counts.numel() * torch.sum((counts / rows) * (probs / rows))
    return aux, torch.stack([load.z for load in loads]).sum() / rows


def token_multiplicity(layout: PackedLayout) -> torch.Tensor | None:
    """[N]: how many samples each token of the batch stands for (None: each one)."""
    if layout.real is not None:
        return layout.real.reshape(-1)
    return None if layout.keys is None else layout.keys.multiplicity


class Router(nn.Module):
    """transformers' TopKRouter: `weight` [E, H] (and gpt-oss's `bias` [E])."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k, self.kind, self.renormalise = args.num_experts_per_tok, args.router, args.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))
        self.bias = nn.Parameter(torch.empty(args.num_experts)) if args.router_bias else None

    @torch.no_grad()
    def reset_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """transformers' init: normal weight and bias."""
        for p in (self.weight, self.bias):
            if p is not None:
                p.normal_(0.0, std, generator=generator)

    def forward(self, x: torch.Tensor, multiplicity: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, RouterLoad]:
        """Tokens x [N, H] -> (expert indices [N, k], their weights [N, k], the load over the
        tokens, each counted `multiplicity` [N] times (None: once))."""
        logits = nn.functional.linear(x, self.weight, self.bias)
        compute = torch.promote_types(logits.dtype, torch.float32)  # transformers' routers: fp32
        probs = torch.softmax(logits, dim=-1, dtype=compute)
        if self.kind == "topk_softmax":  # gpt-oss
            top, index = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top, dim=-1, dtype=compute)
        else:
            weights, index = torch.topk(probs, self.top_k, dim=-1)
            if self.renormalise:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return index, weights, self._load(logits, probs, index, multiplicity)

    def _load(self, logits: torch.Tensor, probs: torch.Tensor, index: torch.Tensor,
              multiplicity: torch.Tensor | None) -> RouterLoad:
        z = torch.logsumexp(logits.to(probs.dtype), dim=-1) ** 2
        ones = torch.ones_like(index, dtype=probs.dtype)
        if multiplicity is None:
            tokens = torch.tensor(float(logits.shape[0]), dtype=probs.dtype, device=logits.device)
        else:
            times = multiplicity.to(probs.dtype)
            probs, z, ones = probs * times[:, None], z * times, ones * times[:, None]
            tokens = times.sum()
        counts = torch.zeros(probs.shape[-1], dtype=probs.dtype, device=probs.device)
        counts = counts.scatter_add(0, index.reshape(-1), ones.reshape(-1))
        return RouterLoad(counts, probs.sum(0), z.sum(), tokens)


class Experts(nn.Module):
    """The experts' weights as transformers 5 stores them, run by `moe_experts`."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        e, h, i = args.num_experts, args.hidden_size, args.moe_intermediate_size
        if args.expert_format == "gpt_oss":  # in-by-out, biases
            self.fmt = gpt_oss_format(args.swiglu_alpha, args.swiglu_limit)
            self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))
            self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i))
            self.down_proj = nn.Parameter(torch.empty(e, i, h))
            self.down_proj_bias = nn.Parameter(torch.empty(e, h))
        else:  # out-by-in, as nn.Linear
            self.fmt = SWIGLU
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
            self.down_proj = nn.Parameter(torch.empty(e, h, i))
            self.gate_up_proj_bias = self.down_proj_bias = None

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(gate_up_proj, down_proj, gate_up_bias, down_bias) as the op takes them, for input of
        `dtype` (LoRA: with the adapters' updates added, packtune.lora.experts)."""
        return self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate_up, down, gate_up_bias, down_bias = self.weights(x.dtype)
        return moe_experts(x, index, weights, gate_up, down, gate_up_bias, down_bias, self.fmt)

    @torch.no_grad()
    def reset_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """transformers' init: normal weights, zero biases."""
        for weight in (self.gate_up_proj, self.down_proj):
            weight.normal_(0.0, std, generator=generator)
        for bias in (self.gate_up_proj_bias, self.down_proj_bias):
            if bias is not None:
                bias.zero_()


@dataclass(frozen=True)
class BlockNames:
    """How a family's transformers code names a sparse block's parts, and in which order it builds
    them (the order of the state dict and of `named_parameters`)."""

    router: str = "gate"
    """The router's attribute: `gate` (Qwen3-MoE, Mixtral, OLMoE) or `router` (gpt-oss)."""
    experts_first: bool = False
    """Qwen3-MoE builds its experts before its router."""


class SparseMoeBlock(nn.Module):
    """The router and the experts; forward returns the output and the layer's `RouterLoad`."""

    def __init__(self, args: ModelArgs, names: BlockNames) -> None:
        super().__init__()
        self.router_name = names.router
        if names.experts_first:
            self.experts = Experts(args)
        setattr(self, names.router, Router(args))
        if not names.experts_first:
            self.experts = Experts(args)

    def forward(self, x: torch.Tensor, multiplicity: torch.Tensor | None) -> tuple[torch.Tensor, RouterLoad]:
        flat = x.reshape(-1, x.shape[-1])
        index, weights, load = getattr(self, self.router_name)(flat, multiplicity)
        return self.experts(flat, index, weights).view_as(x), load


class MoEDecoderLayer(DecoderLayer):
    """A pre-norm decoder block whose MLP is a `SparseMoeBlock` on the sparse layers (a dense MLP of
    `intermediate_size` on Qwen3-MoE's others); forward returns (hidden states, RouterLoad or None)."""

    def __init__(self, args: ModelArgs, layer: int, names: BlockNames) -> None:
        self.names = names
        super().__init__(args, layer)

    def build_mlp(self, args: ModelArgs, layer: int) -> nn.Module:
        return SparseMoeBlock(args, self.names) if args.sparse(layer) else MLP(args)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, multiplicity: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RouterLoad | None]:
        h = x + self.self_attn(self.input_layernorm(x), inputs)
        y = self.post_attention_layernorm(h)
        if isinstance(self.mlp, SparseMoeBlock):
            out, load = self.mlp(y, multiplicity)
            return h + out, load
        return h + self.mlp(y), None


class MoEForCausalLM(LlamaForCausalLM):
    """The MoE families' model: `router_loads` holds the sparse layers' loads of the last forward
    (empty after a generation step, which needs none)."""

    def __init__(self, args: ModelArgs, names: BlockNames = BlockNames()) -> None:
        super().__init__(args, functools.partial(MoEDecoderLayer, names=names))
        self.router_loads: list[RouterLoad] = []

    def _run_layers(self, x: torch.Tensor, inputs: AttentionInputs,
                    layout: PackedLayout | None) -> torch.Tensor:
        multiplicity = None if layout is None else token_multiplicity(layout)
        loads = []
        for layer in self.model.layers:
            x, load = layer(x, inputs, multiplicity)
            if load is not None:
                loads.append(load)
        self.router_loads = loads if inputs.cache is None else []
        return x
