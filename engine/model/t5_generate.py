"""Batched generation with a T5: each prompt encoded once, then one decoder token per sequence per step.

Every sequence of a batch starts from the decoder start token at position 0, so all of them are at the
same step t: the decoder's self-attention cache holds steps 0 .. t-1 of every row (no per-row lengths),
and a step's relative position bias `bias[h, j - t]` is one `[H, 1, t + 1]` block for the whole batch.
Cross-attention reads the keys/values of each row's encoded prompt, projected once per decoder block
at the first step and cached (the prompts padded to the longest, the padding masked). A sequence that
has stopped leaves the batch (`keep`). Decoding itself (greedy, or temperature + top-p) is
generate.py's `next_tokens`, as transformers' `generate`; answers come back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from packtune.kernels import PackedLayout
from packtune.kernels.relative_attention import bias_block
from packtune.model.generate import (
    DEFAULT_BATCH_SIZE,
    decode_in_batches,
    extend_answers,
    next_tokens,
    prompt_ids,
    stop_ids,
)
from packtune.model.t5 import (
    StackInputs,
    T5ForConditionalGeneration,
    T5LayerCrossAttention,
    T5LayerSelfAttention,
)


class T5Cache:
    """The decoding state of B sequences at step t: per decoder block, the self-attention keys/values
    `[B, H, max_len, D]` of steps 0 .. t-1 and the cross-attention keys/values of each row's prompt."""

    def __init__(self, model: T5ForConditionalGeneration, memory: torch.Tensor, layout: PackedLayout,
                 max_len: int) -> None:
        args, blocks = model.args, model.decoder.block
        self.max_len, self.length = max_len, 0
        cu = layout.cu_seqlens.tolist()
        lengths = np.diff(cu)
        offset = np.arange(int(lengths.max()))[None, :]
        starts, ends = np.asarray(cu[:-1])[:, None], np.asarray(cu[1:])[:, None]
        index = torch.from_numpy(np.minimum(starts + offset, ends - 1))
        self._memory = memory[index.to(memory.device)]  # [B, Le, H]: each prompt, padded by its last token
        self._memory_mask = torch.from_numpy(offset < lengths[:, None]).to(memory.device)[:, None, None, :]
        batch = len(lengths)
        shape = (len(blocks), batch, args.num_attention_heads, max_len, args.head_dim)
        self._k = torch.zeros(shape, device=memory.device, dtype=memory.dtype)
        self._v = torch.zeros(shape, device=memory.device, dtype=memory.dtype)
        self._cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def self_attend(self, sublayer: T5LayerSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor) -> torch.Tensor:
        """Store this step's keys/values (`[B, H, D]`) and attend over steps 0 .. t with T5's causal bias."""
        if self.length >= self.max_len:
            raise ValueError(f"T5 cache holds {self.max_len} decoder positions; this step needs "
                             f"{self.length + 1}")
        block, t = sublayer.block, self.length
        self._k[block, :, :, t], self._v[block, :, :, t] = k, v
        mask = bias_block(bias, 1, t + 1, q.dtype)[None]  # [1, H, 1, t + 1]
        out = F.scaled_dot_product_attention(q[:, :, None], self._k[block, :, :, : t + 1],
                                             self._v[block, :, :, : t + 1], attn_mask=mask, scale=1.0)
        return out[:, :, 0]

    def cross_attend(self, sublayer: T5LayerCrossAttention, q: torch.Tensor) -> torch.Tensor:
        """Attend over each row's own prompt (`q` `[B, H, D]`), its keys/values projected once."""
        block = sublayer.block
        if block not in self._cross:
            attn = sublayer.EncDecAttention
            k, v = (attn.heads_of(p, self._memory).transpose(1, 2) for p in (attn.k, attn.v))
            self._cross[block] = k, v
        k, v = self._cross[block]
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=self._memory_mask, scale=1.0)
        return out[:, :, 0]

    def advance(self) -> None:
        """The step is stored in every block."""
        self.length += 1

    def keep(self, rows: list[int]) -> None:
        """Keep only the sequences of `rows` (in this order)."""
        index = torch.tensor(rows, device=self._k.device)
        self._k, self._v = self._k[:, index], self._v[:, index]
        self._memory, self._memory_mask = self._memory[index], self._memory_mask[index]
        self._cross = {b: (k[index], v[index]) for b, (k, v) in self._cross.items()}


@torch.no_grad()
def generate_seq2seq(
    model: T5ForConditionalGeneration,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[list[int]]:
    """New token ids after the decoder start token for each prompt (the EOS included where generation
    stopped on it); `eos_id` None: the model's."""
    ids = prompt_ids(prompts, batch_size, model.shared.weight.device)
    stop = stop_ids(model.args.eos_token_id if eos_id is None else eos_id)
    if max_new_tokens <= 0:
        return [[] for _ in ids]
    return decode_in_batches(ids, batch_size, lambda batch: _decode(model, batch, max_new_tokens, stop,
                                                                    temperature, top_p, generator))


def _decode(model: T5ForConditionalGeneration, prompts: list[torch.Tensor], max_new_tokens: int,
            stop: set[int], temperature: float, top_p: float, generator: torch.Generator | None
            ) -> list[list[int]]:
    """One batch: the prompts encoded as one packed row, then a token per unfinished sequence per step."""
    device = model.shared.weight.device
    layout = PackedLayout.packed([p.numel() for p in prompts]).to(device)
    cache = T5Cache(model, model.encode(torch.cat(prompts), layout), layout, max_new_tokens)
    tokens = torch.full((len(prompts),), model.args.decoder_start_token_id, dtype=torch.long, device=device)
    answers: list[list[int]] = [[] for _ in prompts]
    sequence = list(range(len(prompts)))  # the prompt of each cache row
    while True:
        hidden = model.decoder(model.shared(tokens), StackInputs(None, 0, cache=cache))
        cache.advance()
        tokens = next_tokens(model.logits(model.scaled(hidden)), temperature, top_p, generator)
        live = extend_answers(tokens, answers, sequence, stop, max_new_tokens)
        if not live:
            return answers
        if len(live) < len(sequence):
            cache.keep(live)
            sequence = [sequence[row] for row in live]
            tokens = tokens[torch.tensor(live, device=device)]
