"""The model's own chat template (Jinja), rendered as transformers renders it, with exact loss masks.

`[data] template = "auto"` reads the template from the tokenizer's folder: `tokenizer_config.json`'s
`chat_template` (a string, or a list of named templates: `"auto:NAME"` picks one) or
`chat_template.jinja`. It is rendered in Jinja2's `ImmutableSandboxedEnvironment` with the globals and
filters transformers provides (`raise_exception`, `strftime_now`, `tojson`, `bos_token`, `eos_token`,
`add_generation_prompt`, `tools`), so the text equals `apply_chat_template`'s.

Masks need no `{% generation %}` tags: assistant turn i starts where the rendering of the turns
before it with the generation prompt ends (that rendering must be a prefix of the whole), and ends
after the first control token that directly follows its content (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`, `</s>`; gpt-oss's harmony format writes `<|channel|>final<|message|>` and the
reasoning's own `<|channel|>analysis<|message|>...<|end|>` before the content, which end no turn),
or, where the template rewrites the content so that no control token follows it verbatim, after the
first control token after the start. That token is trained; the template's text after it is not.
An assistant message's `thinking` goes to the template as `thinking` (gpt-oss) and
`reasoning_content` (Qwen3). A template with `{% generation %}` blocks
gets its masks from them instead. Some templates rewrite earlier turns once later ones exist (Qwen3
drops the reasoning of past answers), so turn i, through its end-of-turn token, renders differently
alone than inside the whole conversation (text a template appends after the last turn, as Llama
3.0's always-on assistant header, is not part of any turn and never compared). That is detected per
record and handled by `[data] rewritten_history`: `"error"` (the
default: the record is reported), `"as_rendered"` (train each turn as the whole conversation renders
it, as trainers that render once do) or `"split"` (one sample per assistant turn, the conversation up
to it, only that turn trained: each turn exactly as the model sees it when generating).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from packtune.data.encoding import Rendered
from packtune.data.formats import Conversation
from packtune.data.tokenizer import Tokenizer
from packtune.errors import DataError

REWRITTEN_HISTORY = ("error", "as_rendered", "split")
_START, _END = "\ue000", "\ue001"  # private-use marks around {% generation %} output


def find_chat_template(folder: Path, name: str = "") -> str | None:
    """The chat template in `folder` (named variant `name`), or None when it has none."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    found = config.get("chat_template")
    if isinstance(found, list):
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        if name and name not in named:
            raise DataError(
                f"data.template: {folder} has no chat template named {name!r}; "
                f"it has {', '.join(map(str, named))}",
                "config",
            )
        found = named.get(name or "default")
    elif name:
        raise DataError(f"data.template: {folder} has no named chat templates (asked for {name!r})", "config")
    if not found and (folder / "chat_template.jinja").is_file():
        found = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return found or None


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: marks the text the model generates."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _START + caller() + _END

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplateRenderer:
    """Renders conversations with a Jinja chat template into `Rendered` samples (one, or one per
    assistant turn with `rewritten_history = "split"`)."""

    def __init__(
        self,
        source: str,
        tokenizer: Tokenizer,
        controls: Callable[[str], list[tuple[int, int]]],
        train_on: str = "assistant",
        rewritten_history: str = "error",
    ) -> None:
        import jinja2

        try:
            self.template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise DataError(f"data.template: the chat template does not parse: {e}", "config") from None
        self.tags = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None
        self.controls, self.train_on, self.history = controls, train_on, rewritten_history
        self.values = {"bos_token": tokenizer.bos or "", "eos_token": tokenizer.eos or ""}

    def text(self, messages: list[dict], add_generation_prompt: bool, where: str = "") -> str:
        """The template's rendering (generation marks kept), as `apply_chat_template` renders it."""
        import jinja2

        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, **self.values
            )
        except jinja2.exceptions.TemplateError as e:
            raise DataError(
                f"{where}: the chat template refuses this conversation: {e}", "template_error"
            ) from None

    @staticmethod
    def messages(conv: Conversation) -> list[dict]:
        """The conversation as chat messages; an Alpaca input follows its instruction after a blank line."""
        return [
            {"role": m.role, "content": f"{m.content}\n\n{m.input}" if m.input else m.content,
             **({"thinking": m.thinking, "reasoning_content": m.thinking} if m.thinking else {})}
            for m in conv.messages
        ]

    def prompt(self, conv: Conversation, where: str) -> Rendered:
        """A conversation ending with a user turn and the generation prompt (apply_chat_template's
        `add_generation_prompt=True`)."""
        messages = self.messages(conv)
        text = self.text(messages, True, where)
        return Rendered(text, (), _data_spans(text, messages, self.controls, where))

    def __call__(self, conv: Conversation, where: str) -> list[Rendered]:
        if conv.plain_text:
            raise DataError(
                f'{where}: a `text` record has no turns for a chat template; use template = "raw"', "config"
            )
        messages = self.messages(conv)
        if any(_START in m["content"] or _END in m["content"] for m in messages):
            raise DataError(
                f"{where}: the record holds the private-use characters U+E000/U+E001", "template_error"
            )
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not answers:
            raise DataError(f"{where}: the conversation has no assistant turn", "bad_turn_order")
        full = self.text(messages, False, where)
        if self.tags:
            return [self._from_tags(full, messages, where)]
        starts, consistent = [], True
        for i in answers:
            prompt = self.text(messages[:i], True, where)
            if not full.startswith(prompt):
                raise DataError(
                    f"{where}: message {i}: the template's generation prompt is not how the whole "
                    "conversation renders this turn, so the answer cannot be located",
                    "template_error",
                )
            starts.append(len(prompt))
            alone = self.text(messages[: i + 1], False, where)
            consistent &= full.startswith(alone[: self._turn(alone, starts[-1], messages[i])[1]])
        if not consistent:
            if self.history == "error":
                raise DataError(
                    f"{where}: the chat template renders earlier assistant turns differently once later "
                    "turns exist (e.g. Qwen3 drops past reasoning); set data.rewritten_history = "
                    '"as_rendered" or "split" (see docs/data.md)',
                    "rewritten_history",
                )
            if self.history == "split":
                return [
                    self._one(messages[: i + 1], [(start, messages[i])], where)
                    for i, start in zip(answers, starts, strict=True)
                ]
        turns = list(zip(starts, [messages[i] for i in answers], strict=True))
        return [self._one(messages, turns, where, full)]

    def _one(self, messages: list[dict], answers: list[tuple[int, dict]], where: str,
             full: str | None = None) -> Rendered:
        text = full if full is not None else self.text(messages, False, where)
        if self.train_on == "last":
            answers = answers[-1:]
        trained = [(0, len(text))] if self.train_on == "all" else [self._turn(text, s, m) for s, m in answers]
        return Rendered(text, tuple(trained), _data_spans(text, messages, self.controls, where))

    def _turn(self, text: str, start: int, message: dict) -> tuple[int, int]:
        """The answer `message` from `start` through the first control token that directly follows its
        content, else the first after `start` (or to the end). What a template appends after the last
        turn is never part of it (Llama 3.0's always-on assistant header)."""
        after = self.controls(text[start:])
        content = message["content"].strip()
        for lo, hi in after:
            if text[start : start + lo].rstrip().endswith(content):
                return start, start + hi
        return (start, start + after[0][1]) if after else (start, len(text))

    def _from_tags(self, marked: str, messages: list[dict], where: str) -> Rendered:
        text, trained, pos = [], [], 0
        for k, piece in enumerate(marked.replace(_END, _START).split(_START)):
            if k % 2 and self.train_on != "all":
                trained.append((pos, pos + len(piece)))
            text.append(piece)
            pos += len(piece)
        full = "".join(text)
        if self.train_on == "all":
            trained = [(0, len(full))]
        elif self.train_on == "last":
            trained = trained[-1:]
        return Rendered(full, tuple(trained), _data_spans(full, messages, self.controls, where))


def _data_spans(
    text: str, messages: list[dict], controls: Callable, where: str
) -> tuple[tuple[int, int], ...]:
    """Where each message's text that holds a control-token string stands in `text` (so it stays
    text); such text must be found verbatim. Other text needs no span."""
    spans, pos = [], 0
    for m in messages:
        content = m["content"]
        if not controls(content):
            continue
        at = text.find(content, pos)
        if at < 0:
            raise DataError(
                f"{where}: the record's text holds a control-token string and the chat template changes that "
                "text, so it cannot be kept as text",
                "control_token_in_text",
            )
        spans.append((at, at + len(content)))
        pos = at + len(content)
    return tuple(spans)
