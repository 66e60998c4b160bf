"""The demo's checkable tasks: each draws a random instance and knows its one right answer.

Letter sequences are written with spaces between the letters ("k t a") and numbers in decimal
with the tokenizer splitting digits, so every letter and digit is its own token: a tiny model
trained for minutes can then learn the task itself instead of the spelling of thousands of
sub-word pieces, and an unseen instance is really unseen, not a memorised word.

Where the task allows, instances have a fixed shape (four letters, four digits, three two-digit
numbers):
then the answer's k-th token always sits the same number of tokens after the input token it
comes from, a relation a 4-layer model learns with rotary positions in a few thousand steps,
while variable shapes must wait for content-matching (induction) heads to form, which took
several times the demo's budget when measured. The length task keeps variable lengths: that is
its point.

Each task has several instruction phrasings in the FLAN manner. A phrasing either embeds the
instance (`{x}`; the Alpaca `input` field stays empty) or leaves it for the `input` field, so both
Alpaca prompt variants occur. The last phrasing of each task is held out of training.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

Instance = tuple[str, str]
"""(the task's input text, its answer)."""


@dataclass(frozen=True)
class Task:
    name: str
    phrasings: tuple[str, ...]
    """Instruction templates; `{x}` marks where the input goes, otherwise it fills the `input` field."""
    draw: Callable[[random.Random], Instance]

    @property
    def train_phrasings(self) -> tuple[str, ...]:
        return self.phrasings[:-1]

    @property
    def heldout_phrasing(self) -> str:
        return self.phrasings[-1]


WORD = 4
"""Letters in a reverse / uppercase / lowercase instance."""


def _letters(rng: random.Random, count: int, alphabet: str = string.ascii_lowercase) -> list[str]:
    return [rng.choice(alphabet) for _ in range(count)]


def _reverse(rng: random.Random) -> Instance:
    word = _letters(rng, WORD)
    return " ".join(word), " ".join(reversed(word))


def _uppercase(rng: random.Random) -> Instance:
    word = _letters(rng, WORD)
    return " ".join(word), " ".join(word).upper()


def _lowercase(rng: random.Random) -> Instance:
    word = _letters(rng, WORD, string.ascii_uppercase)
    return " ".join(word), " ".join(word).lower()


def _sort(rng: random.Random) -> Instance:
    digits = [rng.randint(0, 9) for _ in range(4)]
    return " ".join(map(str, digits)), " ".join(map(str, sorted(digits)))


def _largest(rng: random.Random) -> Instance:
    numbers = [rng.randint(10, 99) for _ in range(3)]
    return " ".join(map(str, numbers)), str(max(numbers))


def _add(rng: random.Random) -> Instance:
    """A three-digit number plus a digit (8,010 instances, a three-digit sum): every (units digit,
    digit) pair and carry occurs in training, so an unseen sum is a new combination of steps the
    model has seen."""
    a, b = rng.randint(100, 989), rng.randint(1, 9)
    return f"{a} + {b}", str(a + b)


def _count(rng: random.Random) -> Instance:
    """Count one letter in five drawn from a two-letter alphabet, so counts 0 to 5 all occur."""
    alphabet = rng.sample(string.ascii_lowercase, 2)
    word = _letters(rng, 5, "".join(alphabet))
    target = rng.choice(alphabet)
    return f"{target} in {' '.join(word)}", str(word.count(target))


def _length(rng: random.Random) -> Instance:
    word = _letters(rng, rng.randint(2, 9))
    return " ".join(word), str(len(word))


TASKS: tuple[Task, ...] = (
    Task("reverse", (
        "Reverse the order of these letters.",
        "Write the following letters backwards: {x}",
        "Reverse: {x}",
        "Spell this backwards.",
        "Give the letters in reverse order: {x}",
    ), _reverse),
    Task("uppercase", (
        "Convert these letters to uppercase.",
        "Write in capital letters: {x}",
        "Uppercase: {x}",
        "Rewrite the letters in upper case.",
        "Make every letter a capital: {x}",
    ), _uppercase),
    Task("lowercase", (
        "Convert these letters to lowercase.",
        "Write in small letters: {x}",
        "Lowercase: {x}",
        "Rewrite the letters in lower case.",
        "Make every letter small: {x}",
    ), _lowercase),
    Task("sort", (
        "Sort these numbers from smallest to largest.",
        "Put the numbers in ascending order: {x}",
        "Sort: {x}",
        "Arrange the numbers in increasing order.",
        "Order these numbers from low to high: {x}",
    ), _sort),
    Task("largest", (
        "Which number is the largest?",
        "Find the largest number: {x}",
        "Max: {x}",
        "Give the biggest of these numbers.",
        "What is the largest number in {x}?",
    ), _largest),
    Task("add", (
        "Add the two numbers.",
        "What is {x}?",
        "Compute {x}.",
        "Calculate the sum.",
        "Work out {x}.",
    ), _add),
    Task("count", (
        "Count how many times the letter appears.",
        "How many times does the letter appear: {x}?",
        "Count the letter {x}.",
        "Count the occurrences of the first letter in the rest.",
        "Give the number of times the letter occurs: {x}",
    ), _count),
    Task("length", (
        "How many letters are there?",
        "Count the letters: {x}",
        "Length: {x}",
        "Give the number of letters.",
        "How many letters are in {x}?",
    ), _length),
)

TASKS_BY_NAME: dict[str, Task] = {t.name: t for t in TASKS}
