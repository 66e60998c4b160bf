"""The prompts of the Self-Instruct loop and the parsing of their answers.

Written so that a completion model continues them and a chat model answers them in the same
shape: numbered `Task N:` lines for new instructions, `Input:` / `Output:` (or, output first for
classification tasks, `Class label:` / `Input:`) for an instance.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from packtune.datatools.seed_tasks import SeedTask

NO_INPUT = "<noinput>"
_TASK_LINE = re.compile(r"^\s*(?:Task\s*\d+\s*[:.]|\d+\s*[.)])\s*(.*)$", re.IGNORECASE)


def propose_prompt(examples: Sequence[str]) -> str:
    lines = ["Come up with a series of new, diverse tasks that a text model can do. Write one task per line, "
             "numbered as below.", ""]
    lines += [f"Task {i}: {text}" for i, text in enumerate(examples, 1)]
    lines.append(f"Task {len(examples) + 1}:")
    return "\n".join(lines)


def parse_proposals(response: str) -> list[str]:
    """The instructions in a response: `Task N:` (or `N.`) lines, and a first line without a number
    (a completion model continuing the last `Task N:`)."""
    out = []
    for i, line in enumerate(response.splitlines()):
        match = _TASK_LINE.match(line)
        text = match.group(1) if match else (line if i == 0 else "")
        text = text.strip()
        if text:
            out.append(text)
    return out


def classify_prompt(instruction: str, examples: Sequence[SeedTask]) -> str:
    lines = ["Can the task be regarded as a classification task with finite output labels? "
             "Answer Yes or No.", ""]
    for seed in examples:
        answer = "Yes" if seed.is_classification else "No"
        lines += [f"Task: {seed.instruction}", f"Is it classification? {answer}", ""]
    lines += [f"Task: {instruction}", "Is it classification?"]
    return "\n".join(lines)


def parse_classification(response: str) -> bool:
    return response.strip().lower().startswith("yes")


def instance_prompt(instruction: str, examples: Sequence[SeedTask], classification: bool) -> str:
    """Input first; for a classification task the label first, then an input of that class, so
    the labels do not all follow from inputs the model happened to write (Self-Instruct)."""
    if classification:
        lines = ["Given a classification task, write a class label, then an input that belongs to it.", ""]
        for seed in examples:
            given, output = seed.instances[0]
            lines += [f"Task: {seed.instruction}", f"Class label: {output}", f"Input: {given or NO_INPUT}",
                      ""]
        lines += [f"Task: {instruction}", "Class label:"]
    else:
        lines = [f"Given a task, write an input for it (or {NO_INPUT} when it needs none) and the "
                 "correct output.", ""]
        for seed in examples:
            given, output = seed.instances[0]
            lines += [f"Task: {seed.instruction}", f"Input: {given or NO_INPUT}", f"Output: {output}", ""]
        lines += [f"Task: {instruction}", "Input:"]
    return "\n".join(lines)


def parse_instance(response: str, classification: bool) -> tuple[str, str] | None:
    """(input, output) from an instance answer (the prompt's last label may be missing: a completion
    model continues after it), or None when it has no output."""
    first, second = ("Class label", "Input") if classification else ("Input", "Output")
    text = response.strip()
    if not text.lower().startswith(first.lower()):
        text = f"{first}: {text}"
    match = re.match(rf"{first}\s*:(.*?)\n\s*{second}\s*:(.*?)(?:\n\s*\n|\n\s*Task\s*:|$)", text,
                     re.IGNORECASE | re.DOTALL)
    if not match:
        return None
    a, b = match.group(1).strip(), match.group(2).strip()
    given, output = (b, a) if classification else (a, b)
    if given == NO_INPUT:
        given = ""
    return (given, output) if output else None
