"""Prompts for generation, tokenized exactly as the data pipeline tokenizes the training prompts.

An instruction row is rendered with the training template, cut before the first trained segment
(the answer), and encoded by the pipeline's own `SegmentEncoder`, so the model is asked in the
very token sequence it learned from; no second copy of the template lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from packtune.data.formats import Conversation, Message
from packtune.data.templates import get_template, render
from packtune.data.tokenize import SegmentEncoder, load_tokenizer


class PromptEncoder:
    def __init__(self, tokenizer_path: str | Path, template: str) -> None:
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.template = get_template(template)
        self.encoder = SegmentEncoder(self.tokenizer)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def encode(self, rows: Sequence[dict[str, str]]) -> list[list[int]]:
        """Token ids of each row's prompt: everything up to where the answer starts."""
        prompts = []
        for row in rows:
            conv = Conversation((Message("user", row["instruction"], row.get("input", "")),
                                 Message("assistant", "")))
            segments = render(conv, self.template, "demo prompt")
            cut = next(i for i, seg in enumerate(segments) if seg.trainable)
            prompts.append(segments[:cut])
        encoded = self.encoder.encode_rows(prompts, ["demo prompt"] * len(prompts))
        for result in encoded:
            if isinstance(result, Exception):
                raise result
        return [ids for ids, _ in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        """The answer text of generated `ids` (a trailing EOS dropped)."""
        ids = list(ids)
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.tokenizer.decode_batch([ids])[0]


def rendered_texts(rows: Sequence[dict[str, str]], template: str) -> list[str]:
    """Each row rendered in full by `template` (answer included, BOS/EOS left out): the corpus the
    demo's tokenizer is trained on, so that it learns the template's text too."""
    tmpl = get_template(template)
    texts = []
    for row in rows:
        conv = Conversation((Message("user", row["instruction"], row.get("input", "")),
                             Message("assistant", row["output"])))
        texts.append("".join(seg.text for seg in render(conv, tmpl, "demo") if not seg.special))
    return texts
