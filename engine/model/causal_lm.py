"""What packtune's causal LMs share (the Llama family in llama.py, BLOOM in bloom.py): the output
head (tied to the embeddings or not), from-scratch init, logits and forward.

A subclass builds its body under transformers' names, then calls `add_head()` (so the parameters
come in transformers' order), and defines `embed_tokens`, `decoder_layers` (the blocks FSDP and
activation checkpointing wrap), `embedding_name` and `hidden_states(input_ids, layout, cache)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from packtune.kernels import PackedLayout, RMSNorm
from packtune.model.config import ModelArgs
from packtune.model.kv_cache import KVCache


class CausalLM(nn.Module):
    embedding_name: str
    """The embedding's parameter name (its dtype is the checkpoint's)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.source_dir: Path | None = None
        """The directory `load_pretrained` read, whose tokenizer files `save_pretrained` copies."""

    def add_head(self) -> None:
        self.lm_head = nn.Linear(self.args.hidden_size, self.args.vocab_size, bias=False)
        self.tie_weights()

    @property
    def block_lists(self) -> tuple[nn.ModuleList, ...]:
        """The model's lists of blocks, what LoRA adapts: one here, `decoder_layers` (T5 has two)."""
        return (self.decoder_layers,)

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when configured (again after `to_empty`, which unties)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """transformers' init for training from scratch: N(0, initializer_range), zero biases, unit norms;
        a module with parameters of its own kind (experts, routers, attention sinks) by its
        `reset_weights`."""
        std = self.args.initializer_range
        for module in self.modules():
            if hasattr(module, "reset_weights"):
                module.reset_weights(std, generator)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0 - module.offset)
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on final hidden states, capped as c * tanh(logits / c) when configured (Gemma 2)."""
        logits = self.lm_head(hidden)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward(self, input_ids: torch.Tensor, layout: PackedLayout | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits `[T, V]` or `[B, L, V]`; see `hidden_states` for the inputs."""
        return self.logits(self.hidden_states(input_ids, layout, cache))
