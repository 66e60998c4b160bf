"""Answers from a packtune model for many prompts: each asked in the training template through
`PromptEncoder` and decoded with the KV-cache `generate` (greedy unless a temperature is given).

The KV cache decodes one sequence, so prompts run one after another; the seeded generator is
shared, so a sampled batch is reproducible as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from packtune.data.formats import Message
from packtune.data.prompt import PromptEncoder
from packtune.model.generate import generate


def generate_answers(model: torch.nn.Module, prompts: PromptEncoder,
                     conversations: Sequence[Sequence[Message]], max_new_tokens: int, *,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """The model's answer to each conversation (ending with a user turn)."""
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = prompts.stop_ids
    try:
        return [prompts.decode(generate(model, ids, max_new_tokens, stop, temperature, top_p, generator))
                for ids in prompts.encode(conversations)]
    finally:
        model.train(was_training)


class LocalGenerator:
    """A Hugging Face model directory as a text generator (`complete(prompts)`): each prompt asked
    as a user turn in `template` (auto: the model's chat template, alpaca without one; raw: as given)."""

    def __init__(self, model_dir: str | Path, *, template: str = "auto", max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
                 device: str | None = None) -> None:
        from packtune.model.hf_io import load_pretrained

        self.model = load_pretrained(model_dir, device=device)
        self.prompts = PromptEncoder(model_dir, template)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.seed = seed
        self.calls = 0

    def complete(self, prompts: Sequence[str]) -> list[str]:
        self.calls += 1
        return generate_answers(self.model, self.prompts, [[Message("user", p)] for p in prompts],
                                self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                seed=self.seed + self.calls)
