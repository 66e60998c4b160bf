"""BLOOM / BLOOMZ in Hugging Face's parameter layout (transformers' BloomForCausalLM).

What sets it apart from the Llama family (engine/model/llama.py): ALiBi attention biases instead
of RoPE (slope_h * (key position - query position), from each sample's own positions, so packed
samples never see each other's biases); LayerNorm with a bias everywhere, including one right
after the embedding (`word_embeddings_layernorm`); one fused `query_key_value` projection whose
output is laid out per head as [heads, 3, head_dim]; biases on every linear; an ungated MLP of
4 x hidden with BLOOM's tanh GELU; a head tied to the embeddings by default. LayerNorm is torch's
own (measured faster on the CPU than a compiled or packtune-style fused norm: docs/benchmarks.md).

Module and parameter names are transformers' (`transformer.h.0.self_attention.query_key_value`),
so checkpoints load and export with no name map. Inputs are read as in `LlamaForCausalLM`: a
packed row with its `PackedLayout`, padded rows, or one sequence with a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from packtune.kernels import PackedLayout, varlen_attention
from packtune.kernels.attention import alibi_head_slopes
from packtune.kernels.bloom_gelu import bloom_gelu
from packtune.model.causal_lm import CausalLM
from packtune.model.config import ModelArgs
from packtune.model.kv_cache import KVCache
from packtune.model.llama import dense_causal_attention, resolve_layout


@dataclass(frozen=True)
class BloomInputs:
    """What every layer's attention reads besides its input: the ALiBi slopes, and the packed
    row's `cu_seqlens` / `max_seqlen` (varlen attention), nothing more (padded rows), or a cache.

    The slopes travel as the int32 bit patterns of their fp32 values (`slope_bits`): FSDP2's mixed
    precision casts every floating-point forward input of a block to bf16 (`cast_forward_inputs`
    reaches into dataclasses), which would round them; an integer view passes untouched, and
    `slopes` views it back as fp32 at no cost."""

    slope_bits: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    cache: KVCache | None = None

    @property
    def slopes(self) -> torch.Tensor:
        return self.slope_bits.view(torch.float32)


class BloomAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.query_key_value = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=True)
        self.dense = nn.Linear(args.hidden_size, args.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, inputs: BloomInputs) -> torch.Tensor:
        tokens = x.shape[:-1]
        # [.., heads, 3, head_dim]: q, k, v interleaved per head (views, no copy)
        q, k, v = self.query_key_value(x).view(*tokens, self.num_heads, 3, self.head_dim).unbind(-2)
        if inputs.cache is not None:  # generation: the cache stores k/v and attends (model/kv_cache.py)
            out = inputs.cache.attend(self.layer, q, k, v, window=None, scale=None, softcap=None,
                                      alibi_slopes=inputs.slopes)
        elif inputs.cu_seqlens is not None:  # a packed row
            out = varlen_attention(q, k, v, inputs.cu_seqlens, inputs.max_seqlen, alibi_slopes=inputs.slopes)
        else:  # padded rows
            out = dense_causal_attention(q, k, v, alibi_slopes=inputs.slopes)
        return self.dense(out.reshape(*tokens, -1))


class BloomMLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.hidden_size, args.intermediate_size, bias=True)
        self.dense_4h_to_h = nn.Linear(args.intermediate_size, args.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    """One pre-LayerNorm block; the unit FSDP and activation checkpointing wrap. With
    `residual_post_layernorm` the residual branches start from the normed inputs (transformers'
    `apply_residual_connection_post_layernorm`)."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attention = BloomAttention(args, layer)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = BloomMLP(args)
        self.post_norm_residual = args.residual_post_layernorm

    def forward(self, x: torch.Tensor, inputs: BloomInputs) -> torch.Tensor:
        normed = self.input_layernorm(x)
        h = (normed if self.post_norm_residual else x) + self.self_attention(normed, inputs)
        normed = self.post_attention_layernorm(h)
        return (normed if self.post_norm_residual else h) + self.mlp(normed)


class BloomModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.h = nn.ModuleList(BloomBlock(args, i) for i in range(args.num_hidden_layers))
        self.ln_f = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)


class BloomForCausalLM(CausalLM):
    embedding_name = "transformer.word_embeddings.weight"

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.transformer = BloomModel(args)
        self.add_head()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def hidden_states(self, input_ids: torch.Tensor, layout: PackedLayout | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states: `[T, H]` for a packed row `[T]`, `[B, L, H]` for `[B, L]`;
        With a `cache`, a generation step as `LlamaForCausalLM.hidden_states` describes it."""
        slopes = alibi_head_slopes(self.args.num_attention_heads, input_ids.device).view(torch.int32)
        if cache is not None:
            cache.begin(input_ids, layout)
            inputs = BloomInputs(slopes, cache=cache)
        else:
            layout = resolve_layout(input_ids, layout)
            if layout.keys is not None:
                raise ValueError("BLOOM's ALiBi biases come from each sample's own positions; a row with "
                                 "shared prefixes is not supported (pack the samples apart)")
            inputs = BloomInputs(slopes, layout.cu_seqlens, layout.max_seqlen)
        x = self.transformer.word_embeddings_layernorm(self.transformer.word_embeddings(input_ids))
        for layer in self.transformer.h:
            x = layer(x, inputs)
        if cache is not None:
            cache.advance()
        return self.transformer.ln_f(x)
