"""T5 generation: each decoding step with the cache equals the packed forward of the sequence so far,
and batched greedy answers (prompts of 1 to 25 tokens, some stopping early at their EOS) equal each
prompt alone and transformers' own greedy `generate` of the padded batch (float64 everywhere)."""

from __future__ import annotations

import pytest
import torch
from t5_fixtures import T5_CONFIGS, save_hf_t5

from packtune.model.hf_io import load_pretrained
from packtune.model.t5_batch import pack_pairs
from packtune.model.t5_generate import generate_seq2seq

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = [2, 11, 5, 25, 1, 8, 13]


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5gen")
    return {name: save_hf_t5(name, root / name) for name in T5_CONFIGS}


def test_cached_steps_equal_packed_forward(checkpoints):
    """Each step's next-token logits == the packed forward of (prompt, answer so far) (teacher forcing)."""
    model = load_pretrained(checkpoints["t5_v11"], dtype=torch.float64)
    prompts = _prompts(96)
    answers = generate_seq2seq(model, prompts, 9, eos_id=[])
    pairs = [(p, a) for p, a in zip(prompts, answers, strict=True)]
    batch = pack_pairs(pairs, model.args.decoder_start_token_id)
    with torch.no_grad():
        greedy = model(batch.input_ids, batch.decoder_input_ids, batch.layout).argmax(-1)
    assert greedy.tolist() == batch.labels.tolist()


@pytest.mark.parametrize("name", ["t5_v11", "t5_original", "mt5"])
def test_batched_greedy_equals_one_at_a_time_and_transformers(checkpoints, name):
    model = load_pretrained(checkpoints[name], dtype=torch.float64)
    prompts = _prompts(model.args.vocab_size)
    free = generate_seq2seq(model, prompts, 10, eos_id=[])
    eos = [t for answer in free[1:] for t in answer[2:5] if t not in free[0]][:2]  # some stop early, not 0
    batched = generate_seq2seq(model, prompts, 10, eos, batch_size=3)
    assert batched == [generate_seq2seq(model, [p], 10, eos)[0] for p in prompts]
    assert any(len(a) < 10 for a in batched) and any(len(a) == 10 for a in batched)
    assert all(set(a[:-1]).isdisjoint(eos) for a in batched)
    assert generate_seq2seq(model, prompts, 10, eos, batch_size=32) == batched  # one batch of all
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(checkpoints[name], dtype=torch.float64).eval()
    width = max(PROMPT_LENGTHS)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    # one padded batch; use_cache=False: transformers sizes its decoder cache by num_layers (2), not
    # num_decoder_layers (3)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                      pad_token_id=0, use_cache=False)
    for row, answer in zip(out.tolist(), batched, strict=True):  # row[0]: the decoder start token
        assert row[1 : 1 + len(answer)] == answer and set(row[1 + len(answer) :]) <= {0}


def test_sampling_is_reproducible_for_a_seed(checkpoints):
    model = load_pretrained(checkpoints["t5_original"], dtype=torch.float64)
    prompts = _prompts(96, seed=3)
    draw = lambda seed: generate_seq2seq(model, prompts, 6, eos_id=[], temperature=0.8, top_p=0.9,
                                         generator=torch.Generator().manual_seed(seed))
    first = draw(0)
    assert draw(0) == first and draw(1) != first
