"""Chat templates as data: a conversation renders into segments of (text, trainable).

A template is a handful of format strings, not code, so users add their own in a TOML file
(`[data] template = "my_template.toml"`, keys = the fields of `Template`). Format strings know
five placeholders: `{content}`, `{input}` and `{system}` (the record's text, never parsed for
special tokens, so a record cannot inject control tokens), and `{bos}` / `{eos}` (the tokenizer's own
BOS / EOS ids). Literal strings listed in `special_tokens` become single token ids when the
tokenizer has them.

Shape of a rendered conversation:

    prefix  [system]  user_1  assistant_1  assistant_end  separator  user_2  assistant_2  ...

`user` turns end with the assistant header (the generation prompt), so everything up to the
answer is prompt; the answer and its end-of-turn token are trained (`train_on = "assistant"`,
the default), or only the last answer (`"last"`), or every token (`"all"`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from packtune.data.encoding import Rendered
from packtune.data.formats import Conversation, Message
from packtune.data.tokenizer import Tokenizer
from packtune.errors import DataError

TRAIN_ON = ("assistant", "last", "all")
PLACEHOLDER = re.compile(r"\{(content|input|system|bos|eos)\}")


@dataclass(frozen=True)
class Template:
    name: str
    prefix: str = "{bos}"
    """Start of every sample (prompt)."""
    system: str = "{system}\n\n"
    """The system block, rendered when there is system text; empty when folded into the first user turn."""
    system_default: str = ""
    """System text used when the record has none."""
    system_default_with_input: str = ""
    """Alpaca: the system text for records that have an `input` (falls back to system_default)."""
    user: str = "{content}"
    """A user turn, ending with the assistant header."""
    user_with_input: str = ""
    """Alpaca: a user turn with an `input` block; without it the input is appended to the content."""
    user_first_with_system: str = ""
    """Llama 2: the first user turn carrying the system text."""
    assistant: str = "{content}"
    """The answer (trained)."""
    assistant_end: str = "{eos}"
    """End of an answer (trained, so the model learns to stop)."""
    separator: str = ""
    """Between an answer and the next user turn (prompt)."""
    special_tokens: tuple[str, ...] = field(default=())
    """Literal strings in the formats that are single tokens in the model's vocabulary."""


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> Template:
    """Make `template` available by name (`[data] template = "<name>"`)."""
    TEMPLATES[template.name] = template
    return template


# Stanford Alpaca's two prompts, as its train.py builds them: the answer follows "### Response:".
register_template(
    Template(
        "alpaca",
        system_default=ALPACA_SYSTEM,
        system_default_with_input=ALPACA_SYSTEM_INPUT,
        user="### Instruction:\n{content}\n\n### Response:",
        user_with_input="### Instruction:\n{content}\n\n### Input:\n{input}\n\n### Response:",
        separator="\n\n",
    )
)
# FastChat's vicuna_v1.1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."; the space before the answer
# belongs to the answer, as the model generates it after "ASSISTANT:".
register_template(
    Template(
        "vicuna_v1.1",
        system="{system} ",
        system_default=VICUNA_SYSTEM,
        user="USER: {content} ASSISTANT:",
        assistant=" {content}",
    )
)
register_template(
    Template(
        "chatml",
        prefix="",
        system="<|im_start|>system\n{system}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant_end="<|im_end|>",
        separator="\n",
        special_tokens=("<|im_start|>", "<|im_end|>"),
    )
)
# Meta's Llama 2 chat format: "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nq [/INST] a </s><s>[INST] ...".
register_template(
    Template(
        "llama2",
        system="",
        user="[INST] {content} [/INST]",
        user_first_with_system="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
        assistant=" {content} ",
        separator="{bos}",
    )
)
register_template(
    Template(
        "llama3",
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_end="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    )
)
# No markup: prompt and answer concatenated (prompt/completion data that carries its own format).
register_template(Template("raw", system="{system}\n\n"))
# An encoder-decoder's input (T5, FLAN-T5): the prompt as FLAN writes it, instruction and input a blank
# line apart, earlier turns of a conversation likewise; no BOS, and no EOS (the pair tokenizer appends
# T5's EOS to both sides, data/pairs.py). The default for encoder-decoders.
register_template(Template("seq2seq", prefix="", system="{system}\n\n", assistant_end="", separator="\n\n"))


class Segment(NamedTuple):
    """A piece of rendered text (a NamedTuple: millions are made, so construction must be cheap)."""

    text: str
    trainable: bool
    special: bool = False
    """A single special token: `{bos}`, `{eos}` or one of the template's special_tokens."""
    role: str = ""
    data: bool = False
    """Record text (`{content}`, `{input}`, `{system}`): never a control token."""


def get_template(name: str) -> Template:
    """A registered template by name, or one loaded from a TOML file path."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    path = Path(name)
    if path.suffix == ".toml":
        return load_template_file(path)
    raise DataError(
        f"data.template: unknown template {name!r}; valid: {', '.join(sorted(TEMPLATES))} or a .toml file",
        "config",
    )


def load_template_file(path: Path) -> Template:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data.template: template file {path} does not exist", "config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data.template: {path}: invalid TOML: {e}", "config") from None
    known = {f.name for f in dataclasses.fields(Template)}
    for key, value in raw.items():
        if key not in known:
            raise DataError(
                f"{path}: unknown template key {key!r}; valid: {', '.join(sorted(known))}", "config"
            )
        ok = (
            (isinstance(value, list) and all(isinstance(v, str) for v in value))
            if key == "special_tokens"
            else isinstance(value, str)
        )
        if not ok:
            raise DataError(
                f"{path}: template key {key!r} has the wrong type {type(value).__name__}", "config"
            )
    raw.setdefault("name", path.stem)
    raw["special_tokens"] = tuple(raw.get("special_tokens", ()))
    return Template(**raw)


def render(conv: Conversation, template: Template, where: str, train_on: str = "assistant") -> list[Segment]:
    """The segments of one conversation; adjacent plain-text segments with the same flag are merged."""
    out: list[Segment] = []
    if conv.plain_text:
        _emit(out, template, template.prefix, False, "prefix")
        _emit(out, template, "{content}{eos}", True, "text", content=conv.messages[0].content)
        return _merge(out)
    messages = list(conv.messages)
    system = None
    if messages and messages[0].role == "system":
        system = messages.pop(0).content
    has_input = any(m.input for m in messages)
    if system is None:
        system = (
            template.system_default_with_input
            if has_input and template.system_default_with_input
            else template.system_default
        )
    _check_turns(messages, template, where)
    last = len(messages) - 1
    _emit(out, template, template.prefix, train_on == "all", "prefix")
    folded = bool(system) and bool(template.user_first_with_system)
    if system and not folded:
        if not template.system:
            raise DataError(
                f"{where}: template {template.name!r} has no place for a system message", "unknown_role"
            )
        _emit(out, template, template.system, train_on == "all", "system", system=system)
    for i, message in enumerate(messages):
        if message.role == "user":
            if i > 0:
                _emit(out, template, template.separator, train_on == "all", "separator")
            fmt = template.user_with_input if message.input and template.user_with_input else template.user
            content = message.content
            if message.input and not template.user_with_input:
                content = f"{content}\n\n{message.input}"
            if i == 0 and folded:
                fmt = template.user_first_with_system
            _emit(
                out,
                template,
                fmt,
                train_on == "all",
                "user",
                content=content,
                input=message.input,
                system=system,
            )
        else:
            trained = train_on != "last" or i == last
            _emit(out, template, template.assistant, trained, "assistant", content=message.content)
            _emit(out, template, template.assistant_end, trained, "assistant_end")
    return _merge(out)


def _check_turns(messages: list, template: Template, where: str) -> None:
    for i, message in enumerate(messages):
        if message.role not in ("user", "assistant", "system"):
            raise DataError(
                f"{where}: message {i}: role {message.role!r} is not known to template "
                f"{template.name!r} (known: system, user, assistant)",
                "unknown_role",
            )
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            what = (
                "a system message is only allowed first"
                if message.role == "system"
                else f"expected a {expected} turn (turns must alternate user, assistant, starting with user)"
            )
            raise DataError(f"{where}: message {i}: role {message.role!r}: {what}", "bad_turn_order")
    if not messages or messages[-1].role != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn", "bad_turn_order")


def _emit(
    out: list[Segment], template: Template, fmt: str, trainable: bool, role: str, **values: str
) -> None:
    for text, kind in _parse(fmt, template.special_tokens):
        if kind == "literal":
            out.append(Segment(text, trainable, False, role))
        elif kind == "special":
            out.append(Segment(text, trainable, True, role))
        elif values.get(text):
            out.append(Segment(values[text], trainable, False, role, True))


@functools.cache
def _parse(fmt: str, special_tokens: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """A format string as (text, kind) parts: literal text, a special token, or a placeholder name."""
    parts: list[tuple[str, str]] = []
    split = re.compile("(" + "|".join(re.escape(t) for t in special_tokens) + ")") if special_tokens else None
    pos = 0
    for match in [*PLACEHOLDER.finditer(fmt), None]:
        literal = fmt[pos : match.start() if match else len(fmt)]
        pieces = split.split(literal) if split else [literal]
        parts += [(p, "special" if j % 2 else "literal") for j, p in enumerate(pieces) if p]
        if match:
            name = match.group(1)
            parts.append(("{" + name + "}", "special") if name in ("bos", "eos") else (name, "value"))
            pos = match.end()
    return tuple(parts)


def _merge(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for seg in segments:
        prev = merged[-1] if merged else None
        if (
            prev
            and not prev.special
            and not seg.special
            and (prev.trainable, prev.data) == (seg.trainable, seg.data)
        ):
            role = prev.role if seg.role in prev.role.split("+") else f"{prev.role}+{seg.role}"
            merged[-1] = Segment(prev.text + seg.text, seg.trainable, False, role, seg.data)
        else:
            merged.append(seg)
    return merged


class TemplateRenderer:
    """Renders conversations with a `Template` into the `Rendered` form the encoder takes, with
    `{bos}` / `{eos}` spelled as the tokenizer's own tokens. A `{bos}` that starts the prefix is the
    BOS a tokenizer adds before a text, so the text after it still starts the sample."""

    def __init__(self, template: Template, tokenizer: Tokenizer, train_on: str = "assistant") -> None:
        self.template, self.train_on = template, train_on
        self.names = {"{bos}": tokenizer.bos, "{eos}": tokenizer.eos}
        formats = [v for v in dataclasses.asdict(template).values() if isinstance(v, str)]
        for name, text in self.names.items():
            if text is None and any(name in f for f in formats):
                what = "BOS" if name == "{bos}" else "EOS"
                raise DataError(
                    f"template {template.name!r} uses {name}, but tokenizer {tokenizer.path} has no {what} "
                    f"token (its tokenizer_config.json names none): choose a template without it",
                    "tokenizer",
                )

    @staticmethod
    def messages(conv: Conversation) -> None:
        """No chat messages: a built-in template is checked against the whole text encoded."""
        return None

    def prompt(self, conv: Conversation, where: str) -> Rendered:
        """A conversation ending with a user turn, up to where the answer would start."""
        (full,) = self(Conversation((*conv.messages, Message("assistant", ""))), where)
        cut = full.trained[-1][0] if full.trained else len(full.text)
        data = tuple((lo, min(hi, cut)) for lo, hi in full.data if lo < cut)
        return Rendered(full.text[:cut], (), data, full.leading_bos)

    def __call__(self, conv: Conversation, where: str) -> list[Rendered]:
        if any(m.thinking for m in conv.messages):
            raise DataError(f"{where}: the record gives an assistant turn's `thinking`, which template "
                            f"{self.template.name!r} has no place for; use the model's own chat template "
                            '(data.template = "auto")', "config")
        segments = render(conv, self.template, where, self.train_on)
        leading_bos = bool(segments) and segments[0].special and segments[0].text == "{bos}"
        text, trained, data = [], [], []
        pos = 0
        for seg in segments[1:] if leading_bos else segments:
            piece = self.names.get(seg.text, seg.text) if seg.special else seg.text
            for flag, spans in ((seg.trainable, trained), (seg.data, data)):
                if flag and spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], pos + len(piece))  # one span per answer
                elif flag:
                    spans.append((pos, pos + len(piece)))
            text.append(piece)
            pos += len(piece)
        bos_trained = leading_bos and segments[0].trainable
        return [Rendered("".join(text), tuple(trained), tuple(data), leading_bos, bos_trained)]


def render_text(segments: list[Segment], bos: str = "<s>", eos: str = "</s>") -> str:
    """The rendered conversation as one string (BOS/EOS spelled out), for display and tests."""
    names = {"{bos}": bos, "{eos}": eos}
    return "".join(names.get(s.text, s.text) if s.special else s.text for s in segments)
