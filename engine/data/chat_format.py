"""`[data] template` resolved into how records become ids: the model's own Jinja chat template
(`auto`, `auto:NAME`; data/jinja_template.py) or a built-in / TOML template (data/builtin_templates.py),
and the encoder that turns the rendering into ids and a loss mask (data/encoding.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from packtune.data.builtin_templates import TemplateRenderer, get_template
from packtune.data.encoding import ChatEncoder, Rendered
from packtune.data.formats import Conversation
from packtune.data.jinja_template import ChatTemplateRenderer, find_chat_template
from packtune.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How records become ids: the renderer, the encoder and what `[data] template` resolved to."""

    render: Callable[[Conversation, str], list[Rendered]]
    encoder: ChatEncoder
    resolved: str


def auto_variant(template: str) -> str | None:
    """For `auto` / `auto:NAME` the chat template variant asked for ("" for the default), else None."""
    if template == "auto" or template.startswith("auto:"):
        return template.partition(":")[2]
    return None


def _folder(tokenizer_path: str | Path) -> Path:
    path = Path(tokenizer_path)
    return path if path.is_dir() else path.parent


def make_chat_format(
    template: str,
    tokenizer_path: str | Path,
    tokenizer: Tokenizer,
    train_on: str = "assistant",
    rewritten_history: str = "error",
) -> ChatFormat:
    """`[data] template` resolved: `auto` is the tokenizer folder's chat template, or alpaca when it
    has none; `auto:NAME` a named variant; else a built-in or TOML template (see templates.py)."""
    folder = _folder(tokenizer_path)
    variant = auto_variant(template)
    if variant is not None:
        source = find_chat_template(folder, variant)
        if source is not None:
            encoder = ChatEncoder(tokenizer)
            renderer = ChatTemplateRenderer(
                source, tokenizer, encoder.find_controls, train_on, rewritten_history
            )
            return ChatFormat(renderer, encoder, f"{template} (the chat template in {folder})")
        resolved = f"alpaca (auto: {folder} has no chat template)"
        template = "alpaca"
    else:
        resolved = template
    found = get_template(template)
    return ChatFormat(
        TemplateRenderer(found, tokenizer, train_on), ChatEncoder(tokenizer, found.special_tokens), resolved
    )


def template_identity(template: str, tokenizer_path: str | Path) -> object:
    """What decides the rendering, for the cache key: the chat template's source or the Template."""
    variant = auto_variant(template)
    if variant is not None:
        source = find_chat_template(_folder(tokenizer_path), variant)
        if source is not None:
            return source
        template = "alpaca"
    return dataclasses.asdict(get_template(template))
