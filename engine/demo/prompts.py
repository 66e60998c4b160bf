"""The demo's prompts: instruction rows asked through the pipeline's own `PromptEncoder`, so the
model is asked in the very token sequence it learned from; no second copy of the template lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from packtune.data import prompt
from packtune.data.formats import Conversation, Message
from packtune.data.templates import get_template, render


class PromptEncoder(prompt.PromptEncoder):
    def __init__(self, tokenizer_path: str | Path, template: str) -> None:
        super().__init__(tokenizer_path, template)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def encode(self, rows: Sequence[dict[str, str]]) -> list[list[int]]:
        """Token ids of each row's prompt: everything up to where the answer starts."""
        return super().encode([[Message("user", row["instruction"], row.get("input", ""))] for row in rows])


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
