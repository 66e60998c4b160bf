"""Prompts for generation, rendered and tokenized exactly as training renders and tokenizes them.

A conversation that ends with a user turn is rendered up to where the answer starts (for a chat
template: `apply_chat_template(..., add_generation_prompt=True)`; for a built-in one: with an empty
answer appended and cut there), so the model is asked in the token sequence it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from packtune.data.chat_format import make_chat_format
from packtune.data.formats import Conversation, Message
from packtune.data.pairs import pair_template, prompt_text
from packtune.data.tokenizer import load_tokenizer
from packtune.errors import DataError


class PromptEncoder:
    """`encoder_decoder`: prompts as an encoder-decoder's inputs (data/pairs.py: the template's rendering
    without BOS, EOS appended; `auto` is the `seq2seq` template), as its training data pairs them."""

    def __init__(self, tokenizer_path: str | Path, template: str = "auto", encoder_decoder: bool = False
                 ) -> None:
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.pair_template = pair_template(template) if encoder_decoder else None
        if self.pair_template is None:
            self.format = make_chat_format(template, tokenizer_path, self.tokenizer)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an answer: the tokenizer's end-of-turn ids and its EOS."""
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        return list(dict.fromkeys([*self.tokenizer.end_of_turn_ids, *eos]))

    def encode(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        """Token ids of each conversation (ending with a user turn) up to where the answer starts."""
        if self.pair_template is not None:
            texts = [prompt_text(messages, self.pair_template, "prompt") for messages in conversations]
            encoded = self.tokenizer.encode_chunks(texts, first=True) if texts else []
            return [[*ids, self.tokenizer.eos_id] for ids, _ in encoded]
        render = self.format.render
        prompts = [render.prompt(Conversation(tuple(messages)), "prompt") for messages in conversations]
        encoded = self.format.encoder.encode_samples(prompts, ["prompt"] * len(prompts))
        for result in encoded:
            if isinstance(result, DataError):
                raise result
        return [result.ids for result in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated `ids`, a final stop token dropped."""
        ids = list(ids)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode_batch([ids])[0]
