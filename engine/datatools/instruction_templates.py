"""Instruction templates over a labeled example's columns: Python format strings or sandboxed Jinja.

A template renders an instruction, optionally an Alpaca `input`, and its answer. Format strings
may name plain columns only (`{text}`; no attribute or index access, which `str.format` would
otherwise allow); Jinja runs in jinja2's ImmutableSandboxedEnvironment with undefined names an
error. Either way a name that is not a column is reported with the closest column.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from packtune.config import suggest
from packtune.errors import DataError

ENGINES = ("format", "jinja")


def _format_fields(text: str, where: str) -> list[str]:
    fields = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise DataError(f"{where}: bad format string {text!r}: {e}", "config") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise DataError(f"{where}: {{{name}}} in {text!r}: a format template names a plain column "
                            "({column}; no attributes, indices, conversions or format specs)", "config")
        fields.append(name)
    return fields


_JINJA = None


def _jinja():
    global _JINJA
    if _JINJA is None:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        _JINJA = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    return _JINJA


@dataclass(frozen=True)
class TextTemplate:
    """One template string compiled for its engine."""

    text: str
    engine: str
    where: str
    """Where it was written (spec file and task), for errors."""

    def fields(self) -> list[str]:
        """Column names a format template uses (Jinja templates are checked when rendered)."""
        return _format_fields(self.text, self.where) if self.engine == "format" else []

    def uses(self, name: str) -> bool:
        """Whether the template reads variable `name`."""
        if self.engine == "format":
            return name in self.fields()
        from jinja2 import meta

        return name in meta.find_undeclared_variables(_jinja().parse(self.text))

    def check(self, names: Sequence[str]) -> None:
        for name in self.fields():
            if name not in names:
                raise DataError(f"{self.where}: {{{name}}} in {self.text!r} is not a column"
                                f"{suggest(name, names)}", "config")
        if self.engine == "jinja":
            from jinja2 import TemplateSyntaxError

            try:
                _jinja().from_string(self.text)
            except TemplateSyntaxError as e:
                raise DataError(f"{self.where}: Jinja syntax error in {self.text!r}: {e}", "config") from None

    def render(self, context: Mapping[str, Any]) -> str:
        if self.engine == "format":
            return self.text.format_map(context)
        from jinja2 import UndefinedError
        from jinja2.sandbox import SecurityError

        try:
            return _jinja().from_string(self.text).render(**context)
        except UndefinedError as e:
            name = re.match(r"'(\w+)' is undefined", str(e))
            hint = suggest(name.group(1), list(context)) if name else ""
            raise DataError(f"{self.where}: {e} in {self.text!r}{hint}", "config") from None
        except SecurityError as e:
            raise DataError(f"{self.where}: {e}", "config") from None


@dataclass(frozen=True)
class InstructionTemplate:
    """One way of asking a task: instruction, optional Alpaca `input`, optional answer override."""

    id: str
    """`<task>/<index>`: the report counts records per template under it."""
    instruction: TextTemplate
    input: TextTemplate | None = None
    answer: TextTemplate | None = None
    """None: the task's answer template (or its inverse answer when `inverted`)."""
    inverted: bool = False
    """Input inversion: the template asks for the example's input given its output."""

    def parts(self) -> list[TextTemplate]:
        return [t for t in (self.instruction, self.input, self.answer) if t is not None]


def pick_template(rng: random.Random, templates: Sequence[InstructionTemplate]) -> InstructionTemplate:
    """The per-example draw (one `rng.choice`): templatize and the demo's mix share it."""
    return rng.choice(templates)
