"""Generated Alpaca-shaped instruction data for throughput benchmarks (no download).

What matters for a throughput benchmark is the shape of the data, not its meaning: the length
distribution (Alpaca-GPT4 rendered with the Alpaca template and a 32k sentencepiece tokenizer:
mean ~212 tokens, median ~170, p90 ~420, p99 ~590, long tail to ~840), the share of records with an
`input` (~41 %) and the share of tokens in the response (~73 %). Words are pronounceable
pseudo-words with Zipf frequencies, so a sentencepiece model trained on the text has a realistic
mix of whole-word and sub-word pieces. `length_stats` reports what a tokenizer actually makes of
it, and the benchmark prints that next to its numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

_ONSETS = ("", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "cl",
           "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "io")
_CODAS = ("", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "m")

RESPONSE_WORDS_MEDIAN = 80
"""Median answer length in words; with ~1.35 tokens per word this gives Alpaca's ~110 tokens."""
RESPONSE_WORDS_SIGMA = 0.75
"""Log-normal spread of the answer length: the long tail (p99 ~ 5x the median)."""
INPUT_SHARE = 0.41


def lexicon(size: int, rng: random.Random) -> list[str]:
    """`size` distinct pseudo-words of one to four syllables, shorter words first (they get the
    most frequent Zipf ranks, as in natural language)."""
    words: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < size:
        syllables = min(1 + int(rng.expovariate(1.0) * (1 + len(ordered) / size * 2)), 4)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(syllables))
        if word not in words:
            words.add(word)
            ordered.append(word)
    return ordered


class _Writer:
    def __init__(self, rng: random.Random, vocabulary: Sequence[str]) -> None:
        self.rng = rng
        self.words = vocabulary
        weights = [1.0 / (rank + 2.7) for rank in range(len(vocabulary))]
        total = sum(weights)
        self.cumulative = [0.0] * len(weights)
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w / total
            self.cumulative[i] = acc

    def text(self, n_words: int) -> str:
        """`n_words` words in sentences of 6 to 20 words, some with commas, some with numbers."""
        sentences, left = [], max(n_words, 1)
        while left > 0:
            n = min(left, self.rng.randint(6, 20))
            words = self.rng.choices(self.words, cum_weights=self.cumulative, k=n)
            if self.rng.random() < 0.15:
                words[self.rng.randrange(n)] = str(self.rng.randint(0, 2030))
            if n > 8 and self.rng.random() < 0.4:
                words[self.rng.randrange(2, n - 2)] += ","
            sentences.append(" ".join(words).capitalize() + ".")
            left -= n
        return " ".join(sentences)


def generate_rows(n: int, seed: int = 0, vocabulary_size: int = 6000) -> list[dict[str, str]]:
    """`n` Alpaca records (instruction, input, output) with Alpaca-like lengths."""
    rng = random.Random(seed)
    writer = _Writer(rng, lexicon(vocabulary_size, rng))
    records = []
    for _ in range(n):
        instruction = writer.text(rng.randint(6, 22)).rstrip(".") + rng.choice(("?", ".", ":"))
        has_input = rng.random() < INPUT_SHARE
        inp = writer.text(int(rng.lognormvariate(math.log(14), 0.8))) if has_input else ""
        words = int(rng.lognormvariate(math.log(RESPONSE_WORDS_MEDIAN), RESPONSE_WORDS_SIGMA))
        output = writer.text(min(max(words, 1), 640))
        paragraphs = output.split(". ")
        if len(paragraphs) > 6 and rng.random() < 0.5:
            cut = len(paragraphs) // 2
            output = ". ".join(paragraphs[:cut]) + ".\n\n" + ". ".join(paragraphs[cut:])
        records.append({"instruction": instruction, "input": inp, "output": output})
    return records


def length_stats(
    records: Sequence[dict[str, str]], sample_lengths: Callable[[dict[str, str]], tuple[int, int]]
) -> dict[str, float]:
    """Token-length statistics; `sample_lengths(record)` -> (prompt tokens, response tokens)."""
    prompt, response = zip(*(sample_lengths(r) for r in records), strict=True)
    total = sorted(p + r for p, r in zip(prompt, response, strict=True))

    def pct(q: float) -> int:
        return total[min(int(q * len(total)), len(total) - 1)]

    return {"samples": len(total), "mean": sum(total) / len(total), "median": pct(0.5), "p90": pct(0.9),
            "p99": pct(0.99), "max": total[-1], "response_share": sum(response) / sum(total),
            "input_share": sum(bool(r["input"]) for r in records) / len(records)}
