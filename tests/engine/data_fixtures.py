"""Shared helpers for the data-pipeline tests: tiny tokenizers trained on generated text, row writers.

Trained once per test session (cached on disk under pytest's base temp dir), a few seconds each.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest

from packtune.data.builtin_templates import ALPACA_SYSTEM, ALPACA_SYSTEM_INPUT, VICUNA_SYSTEM

WORDS = (
    "the a to of and in is it you that he was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people my over "
    "know water than call first who may down side been now find any new work part take get place made "
    "live where after back little only round man year came show every good me give our under name "
    "very through just form sentence great think say help low line differ turn cause much mean before "
    "move right boy old too same tell does set three want air well also play small end put home read "
    "hand port large spell add even land here must big high such follow act why ask men change went "
    "light kind off need house picture try us again animal point mother world near build self earth "
    "reverse sort uppercase count sum answer question input output instruction response list"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    if rng.random() < 0.3:
        words[0] = words[0].capitalize()
    text = " ".join(words)
    return text + rng.choice(("", ".", "?", "!", "\n- item 1\n- item 2", " 42 + 17 = 59"))


def corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [
        ALPACA_SYSTEM,
        ALPACA_SYSTEM_INPUT,
        VICUNA_SYSTEM,
        "### Instruction:",
        "### Input:",
        "### Response:",
        "USER: ASSISTANT:",
        "[INST] <<SYS>> <</SYS>> [/INST]",
    ]
    lines += [random_text(rng, rng.randint(3, 40)) for _ in range(n_lines)]
    return lines


@functools.cache
def _train_models(folder: str) -> dict[str, Path]:
    import sentencepiece as spm

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    text = root / "corpus.txt"
    text.write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    common = dict(
        input=str(text),
        model_type="bpe",
        vocab_size=600,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    # A Llama-like model: byte fallback, no normalization, whitespace kept as written.
    spm.SentencePieceTrainer.train(
        model_prefix=str(root / "llama_like"),
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        **common,
    )
    # A lossy model: NFKC normalization and no byte fallback, so some text cannot round-trip.
    spm.SentencePieceTrainer.train(
        model_prefix=str(root / "lossy"), byte_fallback=False, normalization_rule_name="nmt_nfkc", **common
    )
    paths = {"sp": root / "llama_like.model", "sp_lossy": root / "lossy.model"}
    try:
        paths["hf"] = _train_hf(root, text)
    except ImportError:
        pass
    return paths


def _train_hf(root: Path, text: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok.train(
        [str(text)],
        trainers.BpeTrainer(
            vocab_size=800,
            special_tokens=special,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    folder = root / "hf"
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    )
    return folder / "tokenizer.json"


def trained_tokenizers(factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"sp", "sp_lossy", "hf" (when `tokenizers` is installed)} -> path; trained once per session."""
    return _train_models(str(factory.getbasetemp() / "data_tokenizers"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def alpaca_rows(n: int, seed: int = 0, max_words: int = 60) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = {
            "instruction": random_text(rng, rng.randint(2, 15)),
            "input": random_text(rng, rng.randint(1, 20)) if rng.random() < 0.4 else "",
            "output": random_text(rng, rng.randint(1, max_words)),
        }
        rows.append(row)
    return rows
