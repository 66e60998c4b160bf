"""The Llama-family decoder (Llama 1/2/3/3.1, Mistral, Qwen2) in Hugging Face's parameter layout.

Module and parameter names are transformers' own (`model.layers.0.self_attn.q_proj.weight`, ...),
so a Hugging Face checkpoint loads with no name map and exports back unchanged. The model works on
packed input (`input_ids [T]` holding several samples, delimited by `cu_seqlens`, each with its own
positions and causal attention) as well as padded `[B, L]` batches, and returns either logits or
the final hidden states (for a fused linear cross-entropy that never materialises logits).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from packtune.kernels import RMSNorm, swiglu, varlen_attention
from packtune.model.config import ModelArgs
from packtune.model.kv_cache import KVCache
from packtune.model.ops import causal_attention, rotary
from packtune.model.rope import inv_freq, rope_cos_sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.head_dim = args.head_dim
        self.window = args.window(layer)
        hidden = args.hidden_size
        q_dim, kv_dim = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=args.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        tokens = x.shape[:-1]
        q = self.q_proj(x).view(*tokens, -1, self.head_dim)
        k = self.k_proj(x).view(*tokens, -1, self.head_dim)
        v = self.v_proj(x).view(*tokens, -1, self.head_dim)
        q, k = rotary(q, k, cos, sin)
        if cache is not None:
            offset = cache.length
            k, v = cache.update(self.layer, k, v)
            out = causal_attention(q[None], k[None], v[None], window=self.window, q_offset=offset)[0]
        elif x.dim() == 3:
            out = causal_attention(q, k, v, window=self.window)
        elif cu_seqlens is None:
            out = causal_attention(q[None], k[None], v[None], window=self.window)[0]
        else:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, window=self.window)
        return self.o_proj(out.reshape(*tokens, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """One pre-norm block; the unit FSDP and activation checkpointing wrap."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        pad = args.pad_token_id
        # transformers passes pad_token_id as padding_idx: that row's lookup gets no gradient.
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < args.vocab_size else None
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        self.source_dir: Path | None = None
        """The directory `load_pretrained` read, whose tokenizer files `save_pretrained` copies."""

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when configured (again after `to_empty`, which unties)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """transformers' init for training from scratch: N(0, initializer_range), zero biases, unit norms."""
        std = self.args.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states: `[T, H]` for packed `[T]` input, `[B, L, H]` for `[B, L]`.

        Packed input: `cu_seqlens` (int32 `[n+1]`) delimits the samples; positions restart at 0
        in each sample unless `position_ids` are given. With no `cu_seqlens` the row is one
        sample. `cache` (decoding one sequence) continues from the positions already cached.
        """
        if input_ids.dim() not in (1, 2):
            raise ValueError(
                f"input_ids must be [T] (packed) or [B, L] (padded), got shape {tuple(input_ids.shape)}"
            )
        if cache is not None and (input_ids.dim() != 1 or cu_seqlens is not None):
            raise ValueError("a KV cache decodes one sequence: pass input_ids [T] without cu_seqlens")
        if position_ids is None:
            position_ids = _default_positions(input_ids, cu_seqlens, cache.length if cache is not None else 0)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self._inv_freq(position_ids, cu_seqlens), position_ids, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cu_seqlens, max_seqlen, cache)
        if cache is not None:
            cache.advance(input_ids.shape[0])
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits `[T, V]` or `[B, L, V]`; see `hidden_states` for the inputs."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen, cache))

    def _inv_freq(self, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        args = self.args
        if args.rope_scaling is None or args.rope_scaling.rope_type != "dynamic":
            return inv_freq(args, device=position_ids.device)
        seq_len = int(position_ids.max()) + 1  # dynamic NTK depends on the context length: one host sync
        if seq_len > args.max_position_embeddings and cu_seqlens is not None and cu_seqlens.numel() > 2:
            raise ValueError(
                f"dynamic rope scaling: a packed sample reaches position {seq_len - 1} beyond "
                f"max_position_embeddings={args.max_position_embeddings}, where each sample needs its own "
                "frequencies; pack samples beyond that length one per row"
            )
        return inv_freq(args, seq_len, device=position_ids.device)


def _default_positions(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None, offset: int) -> torch.Tensor:
    """0, 1, ... per sample (restarting at each `cu_seqlens` boundary), or per row for `[B, L]`."""
    n = input_ids.shape[-1]
    positions = torch.arange(offset, offset + n, device=input_ids.device)
    if input_ids.dim() == 2:
        return positions.expand(input_ids.shape[0], n)
    if cu_seqlens is None:
        return positions
    starts = cu_seqlens.to(device=input_ids.device, dtype=torch.long)
    sample = torch.searchsorted(starts[1:], positions, right=True)
    return positions - starts[sample]
