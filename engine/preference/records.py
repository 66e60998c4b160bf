"""Preference records in TRL's layouts, read into a prompt and two responses (`Pair`).

    standard          {"prompt": "...", "chosen": "...", "rejected": "..."}
    standard implicit {"chosen": "...", "rejected": "..."}: the prompt is the longest common prefix
                      of the two strings, a space before the point where they part going with the
                      responses (TRL's `extract_prompt`)
    conversational    {"prompt": [turns], "chosen": [turns], "rejected": [turns]} (role / content)
    conv. implicit    {"chosen": [turns], "rejected": [turns]}: the prompt is the turns both share

A standard prompt is one user turn and each response one assistant turn, rendered by the run's
template as a `prompt_completion` record is (template = "raw" renders them as plain text, TRL's
standard layout). The prompt must end with a user turn, each response start and end with an
assistant turn; chosen and rejected must differ. Errors name the file and line (the record), as
every data error does; `data.skip_bad_records` counts and skips them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from packtune.data.formats import Conversation, Message, read_string, read_turns, type_name
from packtune.errors import DataError


@dataclass(frozen=True, slots=True)
class Pair:
    """One preference record: the prompt turns and the two responses' turns."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]

    def conversation(self, side: str) -> Conversation:
        """The prompt followed by the `side` ("chosen" or "rejected") response."""
        return Conversation((*self.prompt, *getattr(self, side)))


def to_pair(record: dict[str, Any], fields: dict[str, str], where: str) -> Pair:
    """A decoded preference record as a `Pair`, every field checked (see the module docstring)."""
    sides = {}
    for side in ("chosen", "rejected"):
        value = record.get(fields[side])
        if value is None:
            raise DataError(f"{where}: missing field {fields[side]!r} (a preference record needs chosen and "
                            "rejected)", "missing_field")
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: field {fields[side]!r}: expected a string or a list of turns, got "
                            f"{type_name(value)}", "wrong_type")
        sides[side] = value
    chosen, rejected = sides["chosen"], sides["rejected"]
    if type(chosen) is not type(rejected):
        raise DataError(f"{where}: chosen and rejected must both be strings or both lists of turns",
                        "wrong_type")
    prompt_key = fields["prompt"]
    if isinstance(chosen, str):
        pair = _standard(record, fields, where)
    else:
        pair = _conversational(record, fields, where)
    if pair.chosen == pair.rejected:
        raise DataError(f"{where}: chosen and rejected are the same response", "identical_responses")
    if not pair.prompt or pair.prompt[-1].role != "user":
        what = "is empty" if not pair.prompt else f"ends with a turn of role {pair.prompt[-1].role!r}"
        raise DataError(f"{where}: the prompt ({prompt_key!r}, or the turns chosen and rejected share) "
                        f"{what}; it must end with a user turn", "bad_turn_order")
    for side in ("chosen", "rejected"):
        turns = getattr(pair, side)
        if not turns:
            raise DataError(f"{where}: the {side} response is empty (its turns are all shared with the other "
                            "side)", "empty_response")
        if turns[0].role != "assistant" or turns[-1].role != "assistant":
            raise DataError(f"{where}: the {side} response must start and end with an assistant turn",
                            "bad_turn_order")
    return pair


def _standard(record: dict[str, Any], fields: dict[str, str], where: str) -> Pair:
    chosen = read_string(record, fields["chosen"], where, response=True)
    rejected = read_string(record, fields["rejected"], where, response=True)
    if fields["prompt"] in record:
        prompt = read_string(record, fields["prompt"], where)
    else:
        prompt, chosen, rejected = _common_prefix(chosen, rejected)
        if not chosen.strip() or not rejected.strip():
            side = "chosen" if not chosen.strip() else "rejected"
            raise DataError(f"{where}: the {side} response is the prompt the two share, with nothing after "
                            "it", "empty_response")
    return Pair((Message("user", prompt),), (Message("assistant", chosen),),
                (Message("assistant", rejected),))


def _common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen rest, rejected rest): TRL's implicit prompt of two strings."""
    at = 0
    while at < min(len(chosen), len(rejected)) and chosen[at] == rejected[at]:
        at += 1
    if 0 < at < min(len(chosen), len(rejected)) and chosen[at - 1] == " ":
        at -= 1
    return chosen[:at], chosen[at:], rejected[at:]


def _conversational(record: dict[str, Any], fields: dict[str, str], where: str) -> Pair:
    role, content = fields["role"], fields["content"]
    chosen = read_turns(record, fields["chosen"], role, content, where)
    rejected = read_turns(record, fields["rejected"], role, content, where)
    if fields["prompt"] in record:
        if not isinstance(record[fields["prompt"]], list):
            raise DataError(f"{where}: field {fields['prompt']!r}: chosen and rejected are lists of turns, "
                            f"so the prompt must be one too, got {type_name(record[fields['prompt']])}",
                            "wrong_type")
        return Pair(read_turns(record, fields["prompt"], role, content, where), chosen, rejected)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return Pair(chosen[:shared], chosen[shared:], rejected[shared:])
