"""Preference records for the preference tests, in each of TRL's layouts, from generated text."""

from __future__ import annotations

import random

from data_fixtures import random_text

LAYOUTS = ("standard", "standard_implicit", "conversational", "conversational_implicit")


def pair_records(n: int, layout: str = "standard", seed: int = 0, max_words: int = 12) -> list[dict]:
    """`n` records of `layout`: a prompt (sometimes a system turn and an earlier exchange, in the
    conversational layouts) and two different answers."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = random_text(rng, rng.randint(2, max_words)).replace("\n", " ")
        chosen = " " + random_text(rng, rng.randint(1, max_words))
        rejected = " " + random_text(rng, rng.randint(1, max_words))
        while rejected == chosen:
            rejected += " no"
        if layout == "standard":
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif layout == "standard_implicit":
            records.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            turns = [{"role": "user", "content": prompt}]
            if rng.random() < 0.5:
                turns = [{"role": "user", "content": random_text(rng, 3)},
                         {"role": "assistant", "content": random_text(rng, 4)}, *turns]
            answer = lambda text: [{"role": "assistant", "content": text.strip()}]  # noqa: E731
            if layout == "conversational":
                records.append({"prompt": turns, "chosen": answer(chosen), "rejected": answer(rejected)})
            else:
                records.append({"chosen": turns + answer(chosen), "rejected": turns + answer(rejected)})
    return records
