"""Readers for instruction data: every supported record layout becomes one `Conversation`.

Layouts (`[data] format`): `alpaca` (instruction / input / output, optional system),
`sharegpt` (conversations of from / value with human / gpt / system), `messages` (OpenAI-style
role / content), `prompt_completion`, `text` (trained in full), and `preference` (TRL's prompt /
chosen / rejected pairs, read by packtune.preference.records). `auto` picks the layout from the
first record's keys. Field names can be renamed with `[data] field_map`.

The files are read by readers.py (JSONL, JSON, CSV, Parquet, Arrow, each as a stream). Every error
names the file and line (item for JSON arrays, record for Parquet and Arrow) and, where it applies,
the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packtune.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference")

DEFAULT_FIELDS = {
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "system": "system",
    "conversations": "conversations",
    "from": "from",
    "value": "value",
    "messages": "messages",
    "role": "role",
    "content": "content",
    "thinking": "thinking",
    "prompt": "prompt",
    "completion": "completion",
    "text": "text",
    "chosen": "chosen",
    "rejected": "rejected",
}

# ShareGPT and OpenAI spellings of the three roles a template knows. Other roles pass through
# unchanged, so the template reports them by name.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    input: str = ""
    """Alpaca's optional `input`, kept apart so the alpaca template can give it its own block."""
    thinking: str = ""
    """An assistant turn's reasoning (a `messages` record's `thinking`), which the model's own chat
    template renders where the model writes it (gpt-oss's analysis channel, Qwen3's <think> block)."""


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    plain_text: bool = False
    """A `text` record: one message trained in full, no chat markup."""


def field_names(field_map: list[str]) -> dict[str, str]:
    """Canonical field name -> the name used in the file, from `["instruction=question", ...]`."""
    fields = dict(DEFAULT_FIELDS)
    for item in field_map:
        canonical, sep, actual = (s.strip() for s in item.partition("="))
        if not sep or not actual:
            raise DataError(f"data.field_map: {item!r} is not canonical=actual", "config")
        if canonical not in fields:
            raise DataError(
                f"data.field_map: unknown field {canonical!r}; valid: {', '.join(fields)}", "config"
            )
        fields[canonical] = actual
    return fields


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record a reader could not turn into a dict (a CSV line with the wrong number of cells):
    raised by `decode_record`, where the record's location is known, so `skip_bad_records` counts it."""

    message: str
    reason: str


def location(path: str | Path, number: int, unit: str) -> str:
    """The text errors use for record `number` of `path`: unit is line, item or record (readers.py)."""
    return f"{path}:{number}" if unit == "line" else f"{path}: {unit} {number}"


def decode_record(where: str, raw: bytes | BadRecord | Any) -> dict[str, Any]:
    """One record as a dict; JSONL bytes are decoded strictly (UTF-8, then JSON)."""
    if isinstance(raw, BadRecord):
        raise DataError(f"{where}: {raw.message}", raw.reason)
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line", "invalid_utf8") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: malformed JSON: {e.msg} (column {e.colno})", "malformed_json"
            ) from None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(raw)}", "wrong_type")
    return raw


def detect_format(record: dict[str, Any], fields: dict[str, str], where: str) -> str:
    """The layout a record is written in, judged by which known fields it has."""
    checks = (
        ("preference", ("chosen", "rejected")),
        ("sharegpt", ("conversations",)),
        ("messages", ("messages",)),
        ("alpaca", ("instruction", "output")),
        ("prompt_completion", ("prompt", "completion")),
        ("text", ("text",)),
    )
    for fmt, needed in checks:
        if all(fields[k] in record for k in needed):
            return fmt
    raise DataError(
        f"{where}: cannot tell the data format from the fields {sorted(record)}; set "
        f"data.format to one of {', '.join(FORMATS)} (and data.field_map to rename fields)",
        "unknown_format",
    )


def to_conversation(record: dict[str, Any], fmt: str, fields: dict[str, str], where: str) -> Conversation:
    """Normalise one decoded record of layout `fmt` into a Conversation, checking every field."""
    if fmt == "alpaca":
        system = read_string(record, fields["system"], where, required=False)
        output = read_string(record, fields["output"], where, response=True)
        user = Message(
            "user",
            read_string(record, fields["instruction"], where),
            read_string(record, fields["input"], where, required=False),
        )
        head = (Message("system", system),) if system else ()
        return Conversation((*head, user, Message("assistant", output)))
    if fmt == "prompt_completion":
        return Conversation(
            (
                Message("user", read_string(record, fields["prompt"], where)),
                Message("assistant", read_string(record, fields["completion"], where, response=True)),
            )
        )
    if fmt == "text":
        return Conversation(
            (Message("assistant", read_string(record, fields["text"], where, response=True)),),
            plain_text=True,
        )
    if fmt in ("sharegpt", "messages"):
        key = fields["conversations" if fmt == "sharegpt" else "messages"]
        role_key, content_key = (
            (fields["from"], fields["value"]) if fmt == "sharegpt" else (fields["role"], fields["content"])
        )
        return Conversation(read_turns(record, key, role_key, content_key, where, fields["thinking"]))
    if fmt == "preference":
        raise DataError(f"{where}: a preference record (chosen / rejected) trains with train.objective = "
                        "dpo, ipo, orpo or simpo, not sft", "config")
    raise DataError(f"data.format: unknown format {fmt!r}; valid: auto, {', '.join(FORMATS)}", "config")


def read_turns(record: dict[str, Any], key: str, role_key: str, content_key: str, where: str,
               thinking_key: str | None = None) -> tuple[Message, ...]:
    """The non-empty list of turns in field `key`, each an object with a role and a content string
    (ShareGPT and OpenAI role names as the template's); an assistant turn must say something and
    may carry its reasoning in `thinking_key`."""
    turns = record.get(key)
    if turns is None:
        raise DataError(f"{where}: missing field {key!r}", "missing_field")
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{where}: field {key!r}: expected a non-empty list of turns, got {type_name(turns)}",
            "wrong_type",
        )
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected an object, got {type_name(turn)}", "wrong_type")
        role = read_string(turn, role_key, at)
        role = ROLE_ALIASES.get(role, role)
        thinking = read_string(turn, thinking_key, at, required=False) if thinking_key else ""
        if thinking and role != "assistant":
            raise DataError(f"{at}: field {thinking_key!r} on a {role} turn (only assistant turns have "
                            "reasoning)", "bad_turn_order")
        messages.append(Message(role, read_string(turn, content_key, at, response=role == "assistant"),
                                thinking=thinking))
    return tuple(messages)


def read_string(
    obj: dict[str, Any], key: str, where: str, *, required: bool = True, response: bool = False
) -> str:
    """Field `key` of `obj` as a string ("" when absent and not required); a response must not be blank."""
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}", "missing_field")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r}: expected a string, got {type_name(value)}", "wrong_type")
    if response and not value.strip():
        raise DataError(f"{where}: field {key!r}: empty response (nothing to train on)", "empty_response")
    return value


def type_name(value: Any) -> str:
    """How an error names the JSON type of `value` ("a list", "a number", ...)."""
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
