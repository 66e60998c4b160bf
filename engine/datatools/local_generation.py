"""Answers from a packtune model for many prompts: each asked in the training template through
`PromptEncoder` and decoded by the batched KV-cache `generate_batch` (greedy unless a temperature is
given), `batch_size` prompts at a time, sorted by length; answers come back in input order.

Greedy answers do not depend on `batch_size`; sampled ones come from one seeded generator, so a
call is reproducible for the same prompts, seed and `batch_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from packtune.data.formats import Message
from packtune.data.prompt import PromptEncoder
from packtune.model.families import encoder_decoder, family_for
from packtune.model.generate import DEFAULT_BATCH_SIZE, generate_batch


def generate_answers(model: torch.nn.Module, prompts: PromptEncoder,
                     conversations: Sequence[Sequence[Message]], max_new_tokens: int, *,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
    """The model's answer to each conversation (ending with a user turn), generated as its family
    generates (`generate_batch`; an encoder-decoder's `generate_seq2seq`: each prompt encoded once)."""
    generate = family_for(model.args.model_type).generate or generate_batch
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = prompts.stop_ids
    try:
        answers = generate(model, prompts.encode(conversations), max_new_tokens, stop, temperature, top_p,
                           generator, batch_size)
        return [prompts.decode(ids) for ids in answers]
    finally:
        model.train(was_training)


class LocalGenerator:
    """A Hugging Face model directory as a text generator (`complete(prompts)`): each prompt asked
    as a user turn in `template` (auto: the model's chat template, alpaca without one; raw: as given)."""

    def __init__(self, model_dir: str | Path, *, template: str = "auto", max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
                 device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        from packtune.model.loading import load_for_inference

        self.model = load_for_inference(model_dir, "auto", device)
        self.prompts = PromptEncoder(model_dir, template, encoder_decoder(self.model))
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.seed, self.batch_size = seed, batch_size
        self.calls = 0

    def complete(self, prompts: Sequence[str]) -> list[str]:
        self.calls += 1
        return generate_answers(self.model, self.prompts, [[Message("user", p)] for p in prompts],
                                self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                seed=self.seed + self.calls, batch_size=self.batch_size)
