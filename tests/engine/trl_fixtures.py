"""What the TRL trainer tests share: a tokenizer built in memory, TRL + PEFT's run with and without
packtune, the trained adapters compared."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from model_fixtures import make_hf_model

from packtune.integrations import apply_packtune


def word_tokenizer(vocab: int):
    """Whitespace-separated words w0..w{vocab-1}, built in memory (nothing downloaded): w0 is the
    padding (and unknown) token, w1 EOS. TRL's trainers want a tokenizer with a pad token."""
    import tokenizers
    import transformers

    model = tokenizers.models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")
    words = tokenizers.Tokenizer(model)
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0", eos_token="w1")


def assert_same_adapters(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    """The two PEFT models' LoRA parameters: the same names, equal to fp32 rounding."""
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    wanted = {n: p for n, p in expected.named_parameters() if "lora_" in n}
    assert adapters.keys() == wanted.keys() and adapters
    for name, p in adapters.items():
        torch.testing.assert_close(p, wanted[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def lora_runs(make_trainer: Callable, tmp_path: Path):
    """TRL + PEFT's own run and the same run with `apply_packtune(trainer.model)` after the trainer is
    built, both trained from one tiny Llama with LoRA on every linear: (reference, trainer).
    `make_trainer(model, out_dir, vocab, peft_config)` builds a trainer."""
    peft = pytest.importorskip("peft")
    base = make_hf_model("llama3_gqa").float()
    base.config.use_cache = False
    vocab = base.config.vocab_size
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    reference = make_trainer(copy.deepcopy(base), tmp_path / "plain", vocab, lora)
    reference.train()
    trainer = make_trainer(copy.deepcopy(base), tmp_path / "patched", vocab, lora)
    apply_packtune(trainer.model)
    trainer.train()
    return reference, trainer
