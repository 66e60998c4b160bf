"""Batched generation: the batched KV cache against full recomputation, batched greedy answers against
one prompt at a time, full recomputation and transformers' own `generate`, family by family (sliding
windows shorter than the prompts, softcaps, q/k norms, partial rotary), with LoRA adapters, and
seeded sampling."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import save_hf_model

from packtune.kernels import PackedLayout
from packtune.model.generate import generate, generate_batch
from packtune.model.hf_io import load_pretrained
from packtune.model.kv_cache import KVCache

transformers = pytest.importorskip("transformers")

FAMILIES = ["llama3_gqa", "mistral_window", "qwen2", "qwen3_gqa", "gemma2", "gemma3", "phi3", "llama_dynamic"]
PROMPT_LENGTHS = [2, 11, 5, 17, 1, 8, 13]  # every sliding window in the fixtures is shorter than most


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_hf_model(name, root / name) for name in FAMILIES}


def greedy_by_recomputation(model, prompt: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """The reference: the whole sequence through the model (no cache) for every new token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_new_tokens:
            token = int(model(torch.tensor(ids))[-1].argmax())
            out.append(token)
            ids.append(token)
            if token in stop:
                break
    return out


def test_cache_prefill_and_steps_equal_full_forward(checkpoints):
    """Packed prefill of 3 prompts (sliding window 6 < two of them), then one token per row, a row
    dropped midway: each step's logits == the full forward of that row's sequence so far."""
    model = load_pretrained(checkpoints["mistral_window"], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (9, 3, 14)]
    cache = KVCache(model.args, 3, 14 + 5, device=torch.device("cpu"), dtype=torch.float64)
    layout = PackedLayout.packed([len(s) for s in seqs])
    with torch.no_grad():
        logits = model(torch.tensor(sum(seqs, [])), layout, cache=cache)
        expected = torch.cat([model(torch.tensor(s)) for s in seqs])
        torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
        rows = [0, 1, 2]  # the sequence in each cache row
        for step in range(5):
            if step == 2:
                moved = cache.keep([0, 2])  # sequence 1 finished: row 2 moves into its place
                assert moved == [0, 2]
                rows = [rows[r] for r in moved]
            new = torch.randint(0, 96, (len(rows),), generator=gen)
            for row, token in zip(rows, new.tolist(), strict=True):
                seqs[row].append(token)
            logits = model(new, cache=cache)
            expected = torch.stack([model(torch.tensor(seqs[row]))[-1] for row in rows])
            torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
        assert cache.lengths == [len(seqs[0]), len(seqs[2])] == [14, 19]
        with pytest.raises(ValueError, match="KV cache holds 19 positions"):
            model(new, cache=cache)
        with pytest.raises(ValueError, match="a KV cache step takes input_ids"):
            model(new[:1], cache=cache)


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_greedy_equals_one_at_a_time_and_transformers(checkpoints, name):
    """Prompts of 1 to 17 tokens in batches of 3 (sorted by length, answers in input order), some
    stopping early at their EOS: == each prompt alone, == recomputing the whole sequence per token,
    == transformers' greedy `generate` of that prompt (float64 everywhere)."""
    model = load_pretrained(checkpoints[name], dtype=torch.float64)
    prompts = _prompts(model.args.vocab_size)
    free = [generate(model, p, 10) for p in prompts]
    eos = [free[1][3], free[4][2]]  # sequences 1 and 4 (at least) stop early
    batched = generate_batch(model, prompts, 10, eos, batch_size=3)
    alone = [generate(model, p, 10, eos) for p in prompts]
    assert batched == alone
    assert any(len(a) < 10 for a in batched) and any(len(a) == 10 for a in batched)
    assert all(set(a[:-1]).isdisjoint(eos) for a in batched)
    assert generate_batch(model, prompts, 10, eos, batch_size=32) == batched  # one batch of all
    if name == "llama_dynamic":  # cached keys keep their frequencies: recomputation differs past the limit
        return
    assert batched == [greedy_by_recomputation(model, p, 10, set(eos)) for p in prompts]
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float64).eval()
    for prompt, answer in zip(prompts, batched, strict=True):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos[0])
        assert out[0, len(prompt):].tolist() == answer


def test_batched_greedy_with_lora_adapters(checkpoints):
    from packtune.lora import LoRASpec, apply_lora

    model = load_pretrained(checkpoints["gemma2"], dtype=torch.float64)
    apply_lora(model, LoRASpec(4, 8.0), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))  # adapters that change the answers
    model.eval()
    prompts = _prompts(model.args.vocab_size, seed=3)
    batched = generate_batch(model, prompts, 8, batch_size=4)
    assert batched == [greedy_by_recomputation(model, p, 8, set()) for p in prompts]
    assert batched == [generate(model, p, 8) for p in prompts]


def test_sampling_is_reproducible_with_a_seed(checkpoints):
    model = load_pretrained(checkpoints["qwen3_gqa"])
    prompts = _prompts(model.args.vocab_size)
    sample = lambda seed: generate_batch(model, prompts, 12, [5], temperature=0.9, top_p=0.9,
                                         generator=torch.Generator().manual_seed(seed), batch_size=3)
    first = sample(7)
    assert first == sample(7) and first != sample(8)
    assert all(0 < len(a) <= 12 and (len(a) == 12 or a[-1] == 5) for a in first)


def test_generate_batch_input_errors(checkpoints):
    model = load_pretrained(checkpoints["llama3_gqa"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(model, [[4], []], 3)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate_batch(model, [[4]], 3, batch_size=0)
    assert generate_batch(model, [[4], [5, 6]], 0) == [[], []]
