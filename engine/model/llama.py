"""The shared decoder of the Llama-like families (Llama 1/2/3/3.x, Mistral, Qwen2, Qwen3, Gemma 2/3,
Phi-3/4, OLMo 2, Granite 3) in Hugging Face's parameter layout.

The families differ by options of one block (see `ModelArgs`; each family's file in families/ sets
them): Qwen3 and Gemma 3 norm q and k per head, OLMo 2 over the whole projection; Gemma scales the
embeddings, norms with 1 + weight, norms the attention and MLP outputs too ("sandwich" norms),
gates with tanh-GELU, scales logits by query_pre_attn_scalar, gives its sliding-window layers their
own RoPE base (Gemma 3) and caps attention and output logits (Gemma 2); OLMo 2 norms only the
sublayers' outputs ("post" norms). Phi-3 keeps q/k/v and gate/up fused in one projection each (its
checkpoint layout) and may rotate only the leading part of each head (`partial_rotary_factor`,
Phi-4-mini). Granite multiplies the embeddings and the sublayers' outputs and divides the logits.

Module and parameter names are transformers' own (`model.layers.0.self_attn.q_proj.weight`, ...),
so a Hugging Face checkpoint loads with no name map and exports back unchanged. The model reads
a batch through its `PackedLayout` (packtune.kernels.packed_layout): a packed row `[T]` holding
several samples (each with its own positions and causal attention, via varlen attention), or
padded `[B, L]` rows. Generation with a KV cache (engine/model/kv_cache.py) is the other path:
packed prompts fill the cache, then each sequence adds one token per step at its own position.
It returns logits or the final hidden states (for a fused linear cross-entropy that never
materialises logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from packtune.kernels import PackedLayout, RMSNorm, geglu, rotary, swiglu, varlen_attention
from packtune.kernels.attention import sdpa_attention
from packtune.kernels.packed_layout import GatheredKeys
from packtune.kernels.qk_attention import gathered_key_attention
from packtune.model.causal_lm import CausalLM
from packtune.model.config import ModelArgs
from packtune.model.kv_cache import KVCache
from packtune.model.rope import RopeTables, longrope_rows


@dataclass(frozen=True)
class AttentionInputs:
    """What every layer's attention reads besides its input: token positions (`[T]` or `[B, L]`),
    the fp32 RoPE tables they index, and either the packed row's `cu_seqlens` / `max_seqlen`
    (varlen attention), nothing more (padded rows: dense causal attention), or a KV cache.
    `local_cos` / `local_sin`: the tables of the sliding-window layers when their RoPE base differs.
    `context`: for a chunk of a row split over context-parallel ranks, the row's chunks
    (packtune.context_parallel.RowChunks), whose `attention` attends over the whole row."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    keys: GatheredKeys | None = None
    """A packed row whose segments attend to gathered keys (prefix sharing), else None."""
    cache: KVCache | None = None
    local_cos: torch.Tensor | None = None
    local_sin: torch.Tensor | None = None
    context: Any = None


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
                           scale: float | None = None, softcap: float | None = None,
                           alibi_slopes: torch.Tensor | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention on `[B, L, Hq, D]` queries and `[B, L, Hk, D]` keys/values (GQA allowed),
    for padded rows. With `window`, a query sees the `window` most recent keys, itself included
    (transformers' `sliding_window`); `scale`, `softcap`, `alibi_slopes` and `sinks` as in
    `varlen_attention`."""
    length = q.shape[1]
    mask, is_causal = None, False
    if window is None or window >= length:
        is_causal = length > 1
    else:
        q_pos = torch.arange(length, device=q.device)[:, None]
        k_pos = torch.arange(length, device=q.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = sdpa_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, softcap=softcap,
                         alibi_slopes=alibi_slopes, enable_gqa=q.shape[1] != k.shape[1], sinks=sinks)
    return out.transpose(1, 2)


def resolve_layout(input_ids: torch.Tensor, layout: PackedLayout | None) -> PackedLayout:
    """`layout`, checked against `input_ids` `[T]` or `[B, L]`; None means one sample per row."""
    if input_ids.dim() not in (1, 2):
        raise ValueError(
            f"input_ids must be [T] (packed) or [B, L] (padded), got shape {tuple(input_ids.shape)}"
        )
    if layout is None:
        n = input_ids.shape[-1]
        layout = (PackedLayout.packed([n]) if input_ids.dim() == 1
                  else PackedLayout.padded([n] * input_ids.shape[0])).to(input_ids.device)
    if layout.positions.shape != input_ids.shape:
        raise ValueError(f"layout positions {tuple(layout.positions.shape)} do not match input_ids "
                         f"{tuple(input_ids.shape)}")
    return layout


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.head_dim = args.head_dim
        self.window = args.window(layer)
        self.local_rope = args.local_rope(layer)
        self.scale = args.attention_scale
        self.softcap = args.attn_logit_softcapping
        hidden = args.hidden_size
        q_dim, kv_dim = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
        self.rotary_dim = args.rotary_dim
        self.fused = args.fused_projections
        if self.fused:  # Phi-3: one projection, split into q, k, v (views, no copy); transformers' order
            self.o_proj = nn.Linear(q_dim, hidden, bias=args.o_bias)
            self.qkv_proj = nn.Linear(hidden, q_dim + 2 * kv_dim, bias=args.qkv_bias)
            self.split = (q_dim, kv_dim, kv_dim)
        else:
            self.q_proj = nn.Linear(hidden, q_dim, bias=args.qkv_bias)
            self.k_proj = nn.Linear(hidden, kv_dim, bias=args.qkv_bias)
            self.v_proj = nn.Linear(hidden, kv_dim, bias=args.qkv_bias)
            self.o_proj = nn.Linear(q_dim, hidden, bias=args.o_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm is not None:  # per head over head_dim ([.., H, D] views), or the whole projection
            q_size, k_size = (args.head_dim, args.head_dim) if args.qk_norm == "head" else (q_dim, kv_dim)
            self.q_norm = RMSNorm(q_size, args.rms_norm_eps, offset=args.norm_offset)
            self.k_norm = RMSNorm(k_size, args.rms_norm_eps, offset=args.norm_offset)
        self.clip_qkv = args.clip_qkv
        if args.attention_sinks:  # gpt-oss: one logit per query head in the softmax's denominator
            self.sinks = nn.Parameter(torch.empty(args.num_attention_heads))

    @torch.no_grad()
    def reset_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """transformers' init of the sinks (the projections are nn.Linear, initialised as such)."""
        if hasattr(self, "sinks"):
            self.sinks.normal_(0.0, std, generator=generator)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        tokens = x.shape[:-1]
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:  # OLMoE
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k, v = (t.view(*tokens, -1, self.head_dim) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (inputs.local_cos, inputs.local_sin) if self.local_rope else (inputs.cos, inputs.sin)
        r = self.rotary_dim
        if r == self.head_dim:
            q, k = rotary(q, k, cos, sin, position_ids=inputs.positions)
        else:  # partial rotary: the leading r dims rotate, the rest pass through
            q_rot, k_rot = rotary(q[..., :r], k[..., :r], cos, sin, position_ids=inputs.positions)
            q, k = torch.cat((q_rot, q[..., r:]), dim=-1), torch.cat((k_rot, k[..., r:]), dim=-1)
        options = dict(window=self.window, scale=self.scale, softcap=self.softcap,
                       sinks=getattr(self, "sinks", None))
        if inputs.cache is not None:  # generation: the cache stores k/v and attends (model/kv_cache.py)
            out = inputs.cache.attend(self.layer, q, k, v, **options)
        elif inputs.keys is not None:  # a packed row with shared prefixes (kernels/qk_attention.py)
            out = gathered_key_attention(q, k, v, inputs.cu_seqlens, inputs.max_seqlen, inputs.keys,
                                         **options)
        elif inputs.context is not None:  # a chunk of a row split over context-parallel ranks
            out = inputs.context.attention(q, k, v, inputs.cu_seqlens, inputs.max_seqlen, **options)
        elif inputs.cu_seqlens is not None:  # a packed row
            out = varlen_attention(q, k, v, inputs.cu_seqlens, inputs.max_seqlen, **options)
        else:  # padded rows
            out = dense_causal_attention(q, k, v, **options)
        return self.o_proj(out.reshape(*tokens, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.fused = args.fused_projections
        if self.fused:  # Phi-3: gate then up in one projection
            self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        else:
            self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
            self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.act = geglu if args.hidden_act == "gelu_pytorch_tanh" else swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(self.act(*self.gate_up_proj(x).chunk(2, dim=-1)))
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """One block; the unit FSDP and activation checkpointing wrap. Its norms stand where
    `args.norm_placement` says, under transformers' names (hence their shifting meaning):

    - "pre" (Llama): `input_layernorm` and `post_attention_layernorm` norm the attention and MLP inputs;
    - "sandwich" (Gemma): `input_layernorm` the attention input, `post_attention_layernorm` its output,
      `pre_feedforward_layernorm` / `post_feedforward_layernorm` the MLP's input and output;
    - "post" (OLMo 2): `post_attention_layernorm` and `post_feedforward_layernorm` the outputs only.

    Each sublayer's output joins the residual times `residual_multiplier` (Granite; 1 elsewhere)."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = self.build_mlp(args, layer)
        norm = lambda: RMSNorm(args.hidden_size, args.rms_norm_eps, offset=args.norm_offset)
        self.placement = args.norm_placement
        if self.placement != "post":
            self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if self.placement == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if self.placement != "pre":
            self.post_feedforward_layernorm = norm()
        self.residual_multiplier = args.residual_multiplier

    def build_mlp(self, args: ModelArgs, layer: int) -> nn.Module:
        """The block's feed-forward part (MoE families: experts on their sparse layers)."""
        return MLP(args)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        if self.placement == "pre":
            h = x + self._scaled(self.self_attn(self.input_layernorm(x), inputs))
            return h + self._scaled(self.mlp(self.post_attention_layernorm(h)))
        if self.placement == "post":
            h = x + self.post_attention_layernorm(self.self_attn(x, inputs))
            return h + self.post_feedforward_layernorm(self.mlp(h))
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), inputs))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier


BlockFactory = Callable[[ModelArgs, int], DecoderLayer]
"""Builds decoder block i from the args (a block class, or a partial of one)."""


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, layer: BlockFactory = DecoderLayer) -> None:
        super().__init__()
        pad = args.pad_token_id
        # transformers passes pad_token_id as padding_idx: that row's lookup gets no gradient.
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < args.vocab_size else None
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=padding_idx)
        self.layers = nn.ModuleList(layer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, offset=args.norm_offset)


class LlamaForCausalLM(CausalLM):
    embedding_name = "model.embed_tokens.weight"
    context_parallel = True
    """Its attention runs a context-parallel chunk's exchange (packtune.context_parallel)."""

    def __init__(self, args: ModelArgs, layer: BlockFactory = DecoderLayer) -> None:
        """`layer(args, i)` builds block i (MoE families: engine/model/moe.py's)."""
        super().__init__(args)
        self.model = LlamaModel(args, layer)
        self.add_head()
        self.rope = RopeTables(args)
        self.local_rope = (RopeTables(replace(args, rope_theta=args.local_rope_theta, rope_scaling=None))
                           if args.local_rope_theta is not None else None)
        """Gemma 3: the sliding-window layers' tables (their own base, no scaling)."""

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder blocks, the units FSDP and activation checkpointing wrap."""
        return self.model.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def hidden_states(self, input_ids: torch.Tensor, layout: PackedLayout | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states: `[T, H]` for a packed row `[T]`, `[B, L, H]` for `[B, L]`.

        `layout` describes the batch (from `PackedLayout.packed` / `.padded`, on the model's
        device); None means one sample per row. With a `cache` this is a generation step instead:
        the prompts packed in `layout` fill the empty cache, or (no layout) `input_ids` `[B]` add
        one token to each of the cache's B sequences.
        """
        if cache is not None:
            return self._generation_step(input_ids, layout, cache)
        full_rows = layout is None
        layout = resolve_layout(input_ids, layout)
        self._check_dynamic_rope(layout)
        cos, sin = self.rope(layout.max_seqlen, input_ids.device)
        rows = self._rope_rows(layout, cos, full_rows)
        inputs = AttentionInputs(rows, cos, sin, layout.cu_seqlens, layout.max_seqlen, layout.keys,
                                 context=getattr(layout, "context", None),
                                 **self._local_tables(layout.max_seqlen, input_ids.device))
        x = self._run_layers(self._embed(input_ids), inputs, layout)
        return self._final_norm(x)

    def _run_layers(self, x: torch.Tensor, inputs: AttentionInputs,
                    layout: PackedLayout | None) -> torch.Tensor:
        """The decoder blocks over the embeddings (`layout`: the batch's, None in a decoding step)."""
        for layer in self.model.layers:
            x = layer(x, inputs)
        return x

    def _generation_step(self, input_ids: torch.Tensor, layout: PackedLayout | None,
                         cache: KVCache) -> torch.Tensor:
        """Packed prompts into an empty cache (`layout`), or one token per cache row (None)."""
        if layout is not None:
            self._check_dynamic_rope(layout)
        positions, end = cache.begin(input_ids, layout)
        cos, sin = self.rope(end, input_ids.device)
        rows = (self._rope_rows(layout, cos, full_rows=False) if layout is not None
                else self._decode_rope_rows(positions, cache.lengths, cos))
        local = self._local_tables(end, input_ids.device)
        inputs = AttentionInputs(rows, cos, sin, cache=cache, **local)
        x = self._run_layers(self._embed(input_ids), inputs, layout)
        cache.advance()
        return self._final_norm(x)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.args.scale_embeddings:  # Gemma: sqrt(hidden) rounded to the weights' dtype, as transformers
            x = x * torch.tensor(self.args.hidden_size**0.5, dtype=torch.float32).to(x.dtype)
        if self.args.embedding_multiplier != 1.0:  # Granite
            x = x * self.args.embedding_multiplier
        return x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm; Granite's division of the logits by `logits_scaling` is applied to its
        output, the lm_head's input (the same product), so every head over it (logits, the fused loss)
        needs nothing of its own."""
        x = self.model.norm(x)
        return x if self.args.logits_scaling == 1.0 else x / self.args.logits_scaling

    def _local_tables(self, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
        if self.local_rope is None:
            return {}
        cos, sin = self.local_rope(seq_len, device)
        return {"local_cos": cos, "local_sin": sin}

    def _check_dynamic_rope(self, layout: PackedLayout) -> None:
        """Dynamic NTK frequencies depend on the context length, so samples packed together must
        share them: refuse a packed row whose longest sample outgrows max_position_embeddings."""
        args = self.args
        if args.rope_scaling is None or args.rope_scaling.rope_type != "dynamic":
            return
        packed = layout.cu_seqlens is not None and layout.cu_seqlens.numel() > 2
        if packed and layout.max_seqlen > args.max_position_embeddings:
            raise ValueError(
                f"dynamic rope scaling: a packed sample reaches position {layout.max_seqlen - 1} beyond "
                f"max_position_embeddings={args.max_position_embeddings}, where each sample needs its own "
                "frequencies; pack samples beyond that length one per row"
            )

    # ---- Phi-3's longrope: short or long factors per sequence ------------------------------------

    def _longrope(self) -> int | None:
        """original_max_position_embeddings under longrope scaling, else None."""
        scaling = self.args.rope_scaling
        longrope = scaling is not None and scaling.rope_type == "longrope"
        return scaling.original_max_position_embeddings if longrope else None

    def _rope_rows(self, layout: PackedLayout, cos: torch.Tensor, full_rows: bool) -> torch.Tensor:
        """Each token's row in the RoPE tables: its position, or under longrope its row in the long
        half for a sample longer than original_max_position_embeddings (as that sample alone gets).
        `full_rows`: padded rows hold no padding (no layout was given)."""
        original = self._longrope()
        if original is None:
            return layout.positions
        if layout.keys is not None:
            raise ValueError("longrope picks each sample's factors by its length, which a row with "
                             "shared prefixes (two samples sharing their first tokens) does not give; pack "
                             "them apart")
        if layout.cu_seqlens is not None:
            return longrope_rows(layout.positions, layout.cu_seqlens, original, cos.shape[0] // 2)
        if not full_rows and layout.positions.shape[0] > 1 and layout.max_seqlen > original:
            raise ValueError(
                f"longrope: padded rows {layout.max_seqlen} wide, beyond original_max_position_embeddings="
                f"{original}: each sample's short or long factors depend on its own length, which padded "
                "rows do not give; pack the samples instead"
            )
        return layout.positions + (cos.shape[0] // 2) * (layout.max_seqlen > original)

    def _decode_rope_rows(self, positions: torch.Tensor, lengths: list[int],
                          cos: torch.Tensor) -> torch.Tensor:
        """A decoding step's rows: each sequence's next position (its longrope half chosen by the
        sequence's length after the step); `lengths` are the cached lengths, host ints."""
        original = self._longrope()
        if original is None:
            return positions
        if original in lengths:
            raise ValueError(
                f"longrope: generation crossing original_max_position_embeddings={original} (a cache of "
                f"{original} tokens growing to {original + 1}) is not supported: transformers recomputes "
                "every cached key with the long factors there; keep prompt + new tokens within it, or give "
                "a longer prompt"
            )
        return positions + (cos.shape[0] // 2) * (positions >= original)
