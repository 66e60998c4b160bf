"""Text generation with a KV cache for a batch of prompts: greedy, or temperature + top-p (nucleus)
sampling; each sequence stops at its own EOS / stop ids.

Decoding follows transformers' `generate`: next-token logits in fp32, argmax for greedy (first
index on ties), temperature before top-p, the nucleus being the most likely tokens whose mass
before them is below `top_p` (the most likely token always stays).

Prompts are sorted by length (longest first) and decoded `batch_size` at a time: one packed
prefill of the batch's prompts, then one token per unfinished sequence per step (see
`packtune.model.kv_cache`); a finished sequence leaves the batch. Answers come back in input order.
Greedy answers do not depend on the batching; sampled ones are reproducible for the same seed,
prompts and `batch_size` (the draws of one step come from one generator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from packtune.kernels import PackedLayout
from packtune.model.causal_lm import CausalLM
from packtune.model.kv_cache import KVCache

DEFAULT_BATCH_SIZE = 32
"""Prompts decoded together by default."""


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the nucleus: tokens, by falling probability, whose preceding mass is < top_p."""
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def next_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of `[B, V]` logits: `[B]` ids."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(~top_p_mask(probs, top_p), 0.0)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def prompt_ids(prompts: Sequence[Sequence[int] | torch.Tensor], batch_size: int,
               device: torch.device) -> list[torch.Tensor]:
    """The prompts as 1-D long tensors on `device`; refuses an empty prompt and batch_size < 1."""
    if batch_size < 1:
        raise ValueError(f"generate: batch_size must be >= 1, got {batch_size}")
    ids = [torch.as_tensor(p, dtype=torch.long).flatten().to(device) for p in prompts]
    for i, p in enumerate(ids):
        if p.numel() == 0:
            raise ValueError(f"generate: prompt {i} is empty")
    return ids


def stop_ids(eos_id: int | Sequence[int] | None) -> set[int]:
    return {eos_id} if isinstance(eos_id, int) else set(eos_id or ())


def decode_in_batches(ids: list[torch.Tensor], batch_size: int,
                      decode: Callable[[list[torch.Tensor]], list[list[int]]]) -> list[list[int]]:
    """`decode` over batches of `batch_size` prompts taken longest first; answers in input order."""
    order = sorted(range(len(ids)), key=lambda i: -ids[i].numel())
    answers: list[list[int]] = [[] for _ in ids]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i, answer in zip(batch, decode([ids[i] for i in batch]), strict=True):
            answers[i] = answer
    return answers


def extend_answers(tokens: torch.Tensor, answers: list[list[int]], sequence: list[int], stop: set[int],
                   max_new_tokens: int) -> list[int]:
    """Append each cache row's new token to its prompt's answer (`sequence[row]`); returns the rows
    that go on (no stop token, fewer than max_new_tokens)."""
    live = []
    for row, token in enumerate(tokens.tolist()):
        answer = answers[sequence[row]]
        answer.append(token)
        if token not in stop and len(answer) < max_new_tokens:
            live.append(row)
    return live


@torch.no_grad()
def generate_batch(
    model: CausalLM,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[list[int]]:
    """New token ids after each prompt (the EOS included where generation stopped on it)."""
    ids = prompt_ids(prompts, batch_size, model.embed_tokens.weight.device)
    stop = stop_ids(eos_id)
    if max_new_tokens <= 0:
        return [[] for _ in ids]
    limit = model.args.max_position_embeddings
    dynamic = model.args.rope_scaling is not None and model.args.rope_scaling.rope_type == "dynamic"
    if dynamic and max((p.numel() for p in ids), default=0) + max_new_tokens > limit:
        batch_size = 1  # dynamic NTK frequencies follow the longest sequence: no sharing past the limit
    return decode_in_batches(ids, batch_size, lambda batch: _decode(model, batch, max_new_tokens, stop,
                                                                    temperature, top_p, generator))


def _decode(model: CausalLM, prompts: list[torch.Tensor], max_new_tokens: int, stop: set[int],
            temperature: float, top_p: float, generator: torch.Generator | None) -> list[list[int]]:
    """One batch: packed prefill, then a token per unfinished sequence until each stops."""
    weight = model.embed_tokens.weight
    lengths = [p.numel() for p in prompts]
    cache = KVCache(model.args, len(prompts), max(lengths) + max_new_tokens, device=weight.device,
                    dtype=weight.dtype)
    layout = PackedLayout.packed(lengths).to(weight.device)
    hidden = model.hidden_states(torch.cat(prompts), layout, cache=cache)
    last = hidden[torch.from_numpy(np.cumsum(lengths) - 1).to(weight.device)]  # each prompt's last position
    answers: list[list[int]] = [[] for _ in prompts]
    sequence = list(range(len(prompts)))  # the prompt of each cache row
    while True:
        tokens = next_tokens(model.logits(last), temperature, top_p, generator)
        live = extend_answers(tokens, answers, sequence, stop, max_new_tokens)
        if not live:
            return answers
        if len(live) < len(sequence):
            moved = cache.keep(live)
            sequence = [sequence[row] for row in moved]
            tokens = tokens[torch.tensor(moved, device=tokens.device)]
        last = model.hidden_states(tokens, cache=cache)


def generate(
    model: CausalLM,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """New token ids after `prompt_ids`: `generate_batch` of one prompt."""
    return generate_batch(model, [prompt_ids], max_new_tokens, eos_id, temperature, top_p, generator)[0]


def generate_text(
    model_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "auto",
    device: str | None = None,
    template: str = "raw",
    adapter: str | Path | None = None,
) -> str:
    """Load `model_dir` (computing in `dtype`, packtune.precision's rule) and return the decoded
    continuation of `prompt`: as given (`raw`), or asked as a user turn in `template` (`auto`: the
    model's chat template), rendered and tokenized exactly as training does (the model's tokenizer
    loaded by packtune.data.tokenizer, BOS as the template places it; an encoder-decoder's input as its
    training pairs render it, data/pairs.py). `adapter`: a PEFT LoRA adapter directory applied on top
    of the model."""
    from packtune.data.formats import Message
    from packtune.data.prompt import PromptEncoder
    from packtune.model.families import family_for
    from packtune.model.loading import load_for_inference

    model = load_for_inference(model_dir, dtype, device)
    if adapter:
        from packtune.lora.peft_format import load_adapter_into

        load_adapter_into(model, adapter)
        model.eval()
    family = family_for(model.args.model_type)
    prompts = PromptEncoder(model_dir, template, family.encoder_decoder)
    eos = prompts.stop_ids or _model_eos(model)
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    ids = prompts.encode([[Message("user", prompt)]])
    generate_ids = family.generate or generate_batch
    new = generate_ids(model, ids, max_new_tokens, eos, temperature, top_p, generator)[0]
    return prompts.decode(new)


def _model_eos(model: CausalLM) -> list[int]:
    """config.json's eos ids, for a tokenizer that names no EOS or end-of-turn token."""
    eos = model.args.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or ())
