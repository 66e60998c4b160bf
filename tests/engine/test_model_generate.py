"""Generation: sampling against transformers' warpers, limits and stop ids, the CLI (batched decoding and
the KV cache: test_model_generate_batch.py)."""

from __future__ import annotations

import io

import pytest
import torch
from model_fixtures import save_hf_model

from packtune.cli import main
from packtune.model.generate import generate, next_tokens, top_p_mask
from packtune.model.hf_io import load_pretrained

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return save_hf_model("mistral_window", tmp_path_factory.mktemp("hf") / "mistral")


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_what_transformers_keeps(top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = 3 * torch.randn(4, 200)
    scores = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
    ours = top_p_mask(torch.softmax(logits / 0.7, dim=-1), top_p)
    assert torch.equal(ours, scores.isfinite())


def test_sampling_follows_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -9.0])
    gen = torch.Generator().manual_seed(0)
    draws = next_tokens(logits.expand(4000, 5), 1.5, 1.0, gen)
    freq = torch.bincount(draws, minlength=5) / 4000
    torch.testing.assert_close(freq, torch.softmax(logits / 1.5, dim=0), atol=0.03, rtol=0)
    nucleus = set(next_tokens(logits.expand(300, 5), 1.5, 0.6, gen).tolist())
    assert nucleus == {0, 1}  # p = .52, .27, ...: mass before token 1 is .52 < .6, before token 2 .79
    assert next_tokens(logits[None], 1.0, 1e-6, gen).tolist() == [0]
    assert next_tokens(torch.stack([logits, logits.flip(0)])).tolist() == [0, 4]  # greedy: argmax per row


def test_generate_limits_and_stop_ids(mistral_dir):
    model = load_pretrained(mistral_dir)
    prompt = [5, 6, 7]
    free = generate(model, prompt, 8, eos_id=None)
    assert len(free) == 8
    assert generate(model, prompt, 8, eos_id=[95, free[2]]) == free[: free.index(free[2]) + 1]
    assert generate(model, prompt, 0) == []
    gen = lambda: torch.Generator().manual_seed(3)
    sampled = generate(model, prompt, 8, temperature=1.0, top_p=0.9, generator=gen())
    assert sampled == generate(model, prompt, 8, temperature=1.0, top_p=0.9, generator=gen())


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    import random

    import sentencepiece as spm

    path = save_hf_model("llama3_gqa", tmp_path_factory.mktemp("hf") / "llama")
    words = "the quick brown fox jumps over a lazy dog then sorts seven numbers in reverse order".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=96, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return path, spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_cli_generate(model_with_tokenizer, capsys):
    path, sp = model_with_tokenizer
    assert main(["generate", "--model", str(path), "--prompt", "the quick", "--max-new-tokens", "6"]) == 0
    model = load_pretrained(path)
    new = generate(model, [sp.bos_id(), *sp.encode("the quick")], 6, eos_id=2)
    assert capsys.readouterr().out == sp.decode([t for t in new if t != 2]) + "\n"

    sample = ["generate", "--model", str(path), "--prompt", "a dog", "--temperature", "0.8", "--top-p", "0.9"]
    assert main([*sample, "--seed", "4"]) == 0 and main([*sample, "--seed", "4"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second


def test_cli_generate_errors(model_with_tokenizer, tmp_path, capsys):
    path, _ = model_with_tokenizer
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--chat", "--template", "raw"]) == 2
    assert "--chat needs a chat template" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "nope: not a directory" in capsys.readouterr().err
