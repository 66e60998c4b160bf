"""T5 (v1.1, FLAN-T5, mT5 and the original) in Hugging Face's parameter layout (transformers'
T5ForConditionalGeneration), run on packed rows of (input, target) pairs as T5X packs them.

What a T5 is, next to the decoders (engine/model/llama.py): an encoder stack over the input and a
decoder stack over the target, which also attends to the encoder's output (cross-attention); both
embed with one table (`shared`). Pre-norm blocks with T5's RMS norm (no mean, no bias); no biases on
any linear; no attention scaling (T5 folds it into its init); a gated-GELU (v1.1, FLAN, mT5) or ReLU
(original T5) feed-forward; no RoPE: a learned relative position bias per head, bucketed by distance
(both directions in the encoder, the past only in the decoder), held by each stack's first block and
added in every block of that stack. The head is tied to the embeddings or not; where transformers
scales the decoder's output by hidden ** -0.5 (`scale_decoder_outputs`), so does packtune, inside
`decode`, so the fused loss on its hidden states needs no change.

A batch is one packed row per stack with a `Seq2SeqLayout` (kernels/seq2seq_layout.py): the inputs
back to back for the encoder, the decoder's inputs (each target shifted right behind the decoder
start token, t5_batch.py) back to back for the decoder, pair i being segment i of both. Generation
(t5_generate.py) encodes the prompts once and decodes one token per sequence per step with a cache.
Module and parameter names are transformers' (`encoder.block.0.layer.0.SelfAttention.q.weight`), so
checkpoints load and export with no name map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from packtune.kernels import PackedLayout, RMSNorm, geglu
from packtune.kernels.cross_attention import varlen_cross_attention
from packtune.kernels.relative_attention import relative_bias, varlen_relative_attention
from packtune.kernels.seq2seq_layout import Seq2SeqLayout
from packtune.model.t5_config import T5Args

if TYPE_CHECKING:
    from packtune.model.t5_generate import T5Cache


@dataclass(frozen=True)
class StackInputs:
    """What every block of a stack reads besides its input: its segments (`cu_seqlens`, `max_seqlen`)
    or, decoding, a cache; the decoder's also read the encoder's output (`memory`) and segments."""

    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    memory: torch.Tensor | None = None
    memory_cu_seqlens: torch.Tensor | None = None
    memory_max_seqlen: int = 0
    cache: T5Cache | None = None


class T5Attention(nn.Module):
    """q, k, v, o of one attention (self or cross); the first block's self-attention also holds the
    stack's bucketed relative position bias table `[num_buckets, heads]`."""

    def __init__(self, args: T5Args, has_relative_attention_bias: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = args.num_attention_heads, args.head_dim
        inner = self.heads * self.head_dim
        self.q = nn.Linear(args.hidden_size, inner, bias=False)
        self.k = nn.Linear(args.hidden_size, inner, bias=False)
        self.v = nn.Linear(args.hidden_size, inner, bias=False)
        self.o = nn.Linear(inner, args.hidden_size, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(args.relative_attention_num_buckets, self.heads)

    def heads_of(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """`linear(x)` viewed per head: `[..., heads, head_dim]`."""
        return linear(x).view(*x.shape[:-1], self.heads, self.head_dim)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, args: T5Args, block: int, causal: bool) -> None:
        super().__init__()
        self.block = block
        self.SelfAttention = T5Attention(args, has_relative_attention_bias=block == 0)
        self.layer_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.causal = causal
        self.max_distance = args.relative_attention_max_distance

    def forward(self, x: torch.Tensor, inputs: StackInputs, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x + attention(norm(x)); the stack's relative bias `[H, 2 max_seqlen - 1]` is computed here in
        the first block (inside its forward, where FSDP has gathered the table) and returned for the
        others."""
        attn = self.SelfAttention
        if bias is None:
            length = inputs.cache.max_len if inputs.cache is not None else inputs.max_seqlen
            bias = relative_bias(attn.relative_attention_bias.weight, length, bidirectional=not self.causal,
                                 max_distance=self.max_distance)
        h = self.layer_norm(x)
        q, k, v = attn.heads_of(attn.q, h), attn.heads_of(attn.k, h), attn.heads_of(attn.v, h)
        if inputs.cache is not None:
            out = inputs.cache.self_attend(self, q, k, v, bias)
        else:
            out = varlen_relative_attention(q, k, v, bias, inputs.cu_seqlens, inputs.max_seqlen,
                                            causal=self.causal, scale=1.0)
        return x + attn.o(out.reshape(*x.shape[:-1], -1)), bias


class T5LayerCrossAttention(nn.Module):
    def __init__(self, args: T5Args, block: int) -> None:
        super().__init__()
        self.block = block
        self.EncDecAttention = T5Attention(args)
        self.layer_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, inputs: StackInputs) -> torch.Tensor:
        """x + attention(norm(x)) over the encoder's output, each decoder segment over its own input."""
        attn = self.EncDecAttention
        q = attn.heads_of(attn.q, self.layer_norm(x))
        if inputs.cache is not None:
            out = inputs.cache.cross_attend(self, q)
        else:
            k, v = attn.heads_of(attn.k, inputs.memory), attn.heads_of(attn.v, inputs.memory)
            out = varlen_cross_attention(q, k, v, inputs.cu_seqlens, inputs.memory_cu_seqlens,
                                         inputs.max_seqlen, inputs.memory_max_seqlen, scale=1.0)
        return x + attn.o(out.reshape(*x.shape[:-1], -1))


class T5DenseGatedActDense(nn.Module):
    """wo(gelu_tanh(wi_0(x)) * wi_1(x)): packtune's GeGLU kernel (transformers' gelu_new is tanh GELU)."""

    def __init__(self, args: T5Args) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.wi_1 = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.wo = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(geglu(self.wi_0(x), self.wi_1(x)))


class T5DenseActDense(nn.Module):
    """wo(relu(wi(x))): the original T5's feed-forward."""

    def __init__(self, args: T5Args) -> None:
        super().__init__()
        self.wi = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.wo = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(torch.relu(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, args: T5Args) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(args) if args.gated else T5DenseActDense(args)
        self.layer_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Self-attention, cross-attention (decoder blocks only), feed-forward; the unit FSDP and
    activation checkpointing wrap. Takes and returns the stack's relative bias (see
    `T5LayerSelfAttention`)."""

    def __init__(self, args: T5Args, index: int, decoder: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(args, index, causal=decoder)])
        if decoder:
            self.layer.append(T5LayerCrossAttention(args, index))
        self.layer.append(T5LayerFF(args))

    def forward(self, x: torch.Tensor, inputs: StackInputs, bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x, bias = self.layer[0](x, inputs, bias)
        if len(self.layer) == 3:
            x = self.layer[1](x, inputs)
        return self.layer[-1](x), bias


class T5Stack(nn.Module):
    def __init__(self, args: T5Args, decoder: bool) -> None:
        super().__init__()
        layers = args.num_decoder_layers if decoder else args.num_hidden_layers
        self.block = nn.ModuleList(T5Block(args, i, decoder) for i in range(layers))
        self.final_layer_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, inputs: StackInputs) -> torch.Tensor:
        bias = None
        for block in self.block:
            x, bias = block(x, inputs, bias)
        return self.final_layer_norm(x)


class T5ForConditionalGeneration(nn.Module):
    embedding_name = "shared.weight"
    """The embedding's parameter name (its dtype is the checkpoint's)."""

    def __init__(self, args: T5Args) -> None:
        super().__init__()
        self.args = args
        self.source_dir: Path | None = None
        """The directory `load_pretrained` read, whose tokenizer files `save_pretrained` copies."""
        self.shared = nn.Embedding(args.vocab_size, args.hidden_size)
        self.encoder = T5Stack(args, decoder=False)
        self.decoder = T5Stack(args, decoder=True)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when configured (again after `to_empty`, which unties)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    @property
    def block_lists(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        """The encoder's and the decoder's blocks: the lists FSDP and activation checkpointing wrap in
        place."""
        return self.encoder.block, self.decoder.block

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """transformers' T5 init for training from scratch: N(0, factor x T5's std) per weight, unit norms."""
        a, factor, tied = self.args, self.args.initializer_factor, self.args.tie_word_embeddings
        d = a.hidden_size ** -0.5
        std = {"q": (a.hidden_size * a.head_dim) ** -0.5, "k": d, "v": d,
               "o": (a.num_attention_heads * a.head_dim) ** -0.5, "relative_attention_bias": d,
               "wi": d, "wi_0": d, "wi_1": d, "wo": a.intermediate_size ** -0.5, "shared": 1.0,
               "lm_head": 1.0}
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(factor)
            elif isinstance(module, nn.Linear | nn.Embedding) and not (name == "lm_head" and tied):
                module.weight.normal_(0.0, factor * std[name.rsplit(".", 1)[-1]], generator=generator)

    def encode(self, input_ids: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """The encoder's output `[Te, H]` for a packed row of inputs `[Te]`."""
        _check_ids("input_ids", input_ids, layout)
        return self.encoder(self.shared(input_ids), StackInputs(layout.cu_seqlens, layout.max_seqlen))

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, layout: Seq2SeqLayout,
               ) -> torch.Tensor:
        """The decoder's final hidden states `[Td, H]` (scaled when `scale_decoder_outputs`: the head's
        input) for a packed row of decoder inputs `[Td]` over the encoder's output `memory`."""
        _check_ids("decoder_input_ids", decoder_input_ids, layout.decoder)
        enc, dec = layout.encoder, layout.decoder
        inputs = StackInputs(dec.cu_seqlens, dec.max_seqlen, memory, enc.cu_seqlens, enc.max_seqlen)
        return self.scaled(self.decoder(self.shared(decoder_input_ids), inputs))

    def scaled(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final-normed hidden states as the head reads them (times d_model ** -0.5 where
        `scale_decoder_outputs`)."""
        return hidden * self.args.hidden_size ** -0.5 if self.args.scale_decoder_outputs else hidden

    def hidden_states(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                      layout: Seq2SeqLayout) -> torch.Tensor:
        """The head's input `[Td, H]` for one packed row of pairs: what the fused loss reads."""
        return self.decode(decoder_input_ids, self.encode(input_ids, layout.encoder), layout)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                layout: Seq2SeqLayout) -> torch.Tensor:
        """Logits `[Td, V]` of a packed row of pairs; see `hidden_states`."""
        return self.logits(self.hidden_states(input_ids, decoder_input_ids, layout))


def _check_ids(name: str, ids: torch.Tensor, layout: PackedLayout) -> None:
    if ids.dim() != 1 or ids.shape[0] != layout.num_tokens:
        raise ValueError(f"{name} must be a packed row [{layout.num_tokens}] (its layout's tokens), "
                         f"got shape {tuple(ids.shape)}")
