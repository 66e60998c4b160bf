"""(input, target) pairs for an encoder-decoder (T5, FLAN-T5, mT5): records -> token ids of both sides.

An encoder-decoder reads a prompt and writes an answer, and has no chat template. From every record
layout packtune reads (formats.py):

- each assistant turn is one pair (`train_on = "last"`: the last turn only); its input is the
  conversation before it rendered by `[data] template` (`auto`: the built-in `seq2seq`, the prompt as
  FLAN writes it: instruction and input a blank line apart, earlier turns likewise) with the
  template's BOS / EOS left out, its target the answer's text;
- both sides are encoded as the tokenizer encodes a text on its own, then EOS appended, as T5's
  tokenizer does (`tokenizer(prompt)`, `tokenizer(text_target=answer)`): a normalizer that rewrites
  text (T5's folds whitespace runs, so newlines become spaces) rewrites it here as there;
- the input has at most `max_tokens` tokens, the target at most `max_target_tokens` (0: max_tokens),
  EOS included; a longer side drops the pair or, with `truncation = "truncate"`, is cut to the limit
  with EOS kept last (transformers' truncation).

A pair is stored as one sample of `TokenizedDataset`'s arrays: the input's ids, then the target's, the
mask True on the target. So the tokenize-once cache, the held-out split, the data report and the
sampler take pairs unchanged; `pair_lengths` splits a sample into its two sides again (every input
holds at least its EOS, so the target is exactly the masked tokens).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from packtune.data.builtin_templates import Template, get_template, render
from packtune.data.chat_format import auto_variant
from packtune.data.formats import Conversation, Message, decode_record, field_names, location, to_conversation
from packtune.data.record_errors import settle_errors
from packtune.data.tokenizer import load_tokenizer
from packtune.errors import ConfigError, DataError

DEFAULT_TEMPLATE = "seq2seq"


def pair_template(name: str) -> Template:
    """`[data] template` for pairs: `auto` is `seq2seq`; a built-in or TOML template renders the input."""
    variant = auto_variant(name)
    if variant:
        raise ConfigError(f"data.template = {name!r}: an encoder-decoder has no chat template to pick from; "
                          f"use auto ({DEFAULT_TEMPLATE}), a built-in template or a .toml file")
    return get_template(DEFAULT_TEMPLATE if variant == "" else name)


def check_pair_options(train_on: str, template: str) -> None:
    """The [data] keys an encoder-decoder reads differently, checked before anything is tokenized."""
    if train_on == "all":
        raise ConfigError('data.train_on = "all": an encoder-decoder trains on its targets only (the input '
                          'goes to the encoder); use "assistant" (a pair per answer) or "last"')
    pair_template(template)


def render_pairs(conv: Conversation, template: Template, train_on: str, where: str) -> list[tuple[str, str]]:
    """(input text, target text) of each trained assistant turn of `conv`."""
    if conv.plain_text:
        raise DataError(f"{where}: a text record has no prompt and answer; an encoder-decoder trains on "
                        "(input, target) pairs (use alpaca, prompt_completion, messages or sharegpt records)",
                        "wrong_type")
    turns = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    return [(prompt_text(conv.messages[:i], template, where), conv.messages[i].content)
            for i in (turns[-1:] if train_on == "last" else turns)]


def prompt_text(messages: Sequence[Message], template: Template, where: str) -> str:
    """The input asking for the answer after `messages` (which end with a user turn): the template's
    rendering up to where the answer starts, its BOS / EOS left out."""
    asked = Conversation((*messages, Message("assistant", "")))
    segments = render(asked, template, where, "last")  # only the answer's own markup is trained
    return "".join(s.text for s in segments if not s.special and not s.trainable)


def pair_lengths(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """(input lengths, target lengths) of a dataset of pairs (see the module docstring)."""
    targets = np.asarray(dataset.label_counts, dtype=np.int64)
    return dataset.lengths - targets, targets


class PairChunkTokenizer:
    """Tokenizes chunks of raw records into pairs for one process: dataset.py's `ChunkTokenizer` for an
    encoder-decoder (the same job keys and result)."""

    def __init__(self, job: dict[str, Any], threads: int = 1) -> None:
        self.job = job
        self.fields = field_names(job["field_map"])
        self.tokenizer = load_tokenizer(job["tokenizer"], threads)
        if self.tokenizer.eos_id is None:
            raise DataError(f"tokenizer {job['tokenizer']}: no EOS token, which an encoder-decoder appends "
                            "to both sides of a pair", "tokenizer")
        self.template = pair_template(job["template"])
        self.limits = {"input": job["max_tokens"], "target": job["max_target_tokens"] or job["max_tokens"]}

    def describe(self) -> dict[str, Any]:
        """The template and the special-token ids used, for the data report."""
        tok = self.tokenizer
        return {"template": f"{self.template.name} (input; target: the answer), EOS after both",
                "bos_id": tok.bos_id, "eos_id": tok.eos_id, "end_of_turn_ids": [tok.eos_id]}

    def __call__(self, chunk: list[tuple[int, Any]]) -> dict[str, Any]:
        job = self.job
        errors: list[tuple[int, DataError]] = []
        texts: list[str] = []
        numbers: list[int] = []
        for number, raw in chunk:
            where = location(job["path"], number, job["unit"])
            try:
                conv = to_conversation(decode_record(where, raw), job["format"], self.fields, where)
                for prompt, answer in render_pairs(conv, self.template, job["train_on"], where):
                    texts += [prompt, answer]
                    numbers.append(number)
            except DataError as e:
                errors.append((number, e))
        encoded = [ids for ids, _ in self.tokenizer.encode_chunks(texts, first=True)] if texts else []
        dropped, truncated = Counter(), Counter()
        ids_out: list[int] = []
        mask_out: list[bool] = []
        lengths, kept = [], []
        for k, number in enumerate(numbers):
            sides = {}
            for side, ids in (("input", encoded[2 * k]), ("target", encoded[2 * k + 1])):
                ids = [*ids, self.tokenizer.eos_id]
                limit = self.limits[side]
                if len(ids) > limit:
                    reason = "too_long" if side == "input" else "target_too_long"
                    if job["truncation"] == "drop":
                        dropped[reason] += 1
                        break
                    ids = [*ids[: limit - 1], self.tokenizer.eos_id]
                    truncated[reason] += 1
                sides[side] = ids
            else:
                ids_out += sides["input"] + sides["target"]
                mask_out += [False] * len(sides["input"]) + [True] * len(sides["target"])
                lengths.append(len(sides["input"]) + len(sides["target"]))
                kept.append(number)
        kept_errors = settle_errors(errors, job["skip_bad_records"], dropped)
        return {
            "tokens": np.array(ids_out, dtype=np.int32),
            "mask": np.array(mask_out, dtype=bool),
            "lengths": np.array(lengths, dtype=np.int64),
            "lines": np.array(kept, dtype=np.int64),
            "dropped": dropped,
            "truncated": truncated,
            "straddling": 0,
            "fidelity_checked": 0,
            "chat_format": self.describe(),
            "errors": kept_errors,
        }
