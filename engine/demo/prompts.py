"""The demo's tokenizer corpus: records rendered by the training template (the demo asks its prompts
through `packtune.data.prompt.PromptEncoder`, as training tokenizes them)."""

from __future__ import annotations

from collections.abc import Sequence

from packtune.data.builtin_templates import get_template, render
from packtune.data.formats import Conversation, Message


def rendered_texts(records: Sequence[dict[str, str]], template: str) -> list[str]:
    """Each record rendered in full by `template` (answer included, BOS/EOS left out): the corpus the
    demo's tokenizer is trained on, so that it learns the template's text too."""
    tmpl = get_template(template)
    texts = []
    for record in records:
        conv = Conversation((Message("user", record["instruction"], record.get("input", "")),
                             Message("assistant", record["output"])))
        texts.append("".join(seg.text for seg in render(conv, tmpl, "demo") if not seg.special))
    return texts
