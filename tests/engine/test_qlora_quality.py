"""QLoRA against LoRA on a real pretrained model (stories260K, ../shared/real): the same run with the
base stored as NF4 reaches a held-out loss within 2 % of LoRA's over an unquantised base, after the
same tokens (issue #17's QLoRA quality target). Story-shaped records the base model half knows:
LoRA has something real to learn, and an NF4 base that lost too much would show in the loss."""

import json
import random
from pathlib import Path

import pytest
from data_fixtures import write_jsonl
from real_files import real_path

from packtune.cli import main

pytest.importorskip("torchao", reason="QLoRA needs the qlora extra (torchao)")

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "lora_demo.toml"
NAMES = ["Lily", "Tom", "Sue", "Ben", "Mia", "Max", "Anna", "Sam"]
THINGS = ["ball", "dog", "cat", "kite", "box", "car", "bird", "hat"]
COLORS = ["red", "blue", "green", "big", "little", "yellow"]
PLACES = ["park", "garden", "house", "yard", "forest", "school"]
FEELINGS = ["happy", "sad", "scared", "proud", "sleepy", "excited"]


def story_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Stories of one shape whose details are drawn at random: learnable, with an entropy floor
    that keeps the loss well above zero (a relative comparison stays meaningful)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        color, place, feeling = rng.choice(COLORS), rng.choice(PLACES), rng.choice(FEELINGS)
        records.append({"instruction": f"Tell a short story about {name} and a {thing}.", "input": "",
                        "output": f"{name} had a {color} {thing}. {name} took the {thing} to the {place}. "
                                  f"{name} was {feeling}. The end."})
    return records


def _eval_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.mark.slow
def test_qlora_reaches_loras_held_out_loss_on_a_real_model(tmp_path):
    model_dir = real_path("stories260K")
    data = write_jsonl(tmp_path / "stories.jsonl", story_records(120))
    losses = {}
    for base in ("float32", "nf4"):
        out = tmp_path / base
        overrides = [f'model.path="{model_dir}"', f'data.path="{data}"', 'data.format="alpaca"',
                     f'data.tokenizer="{model_dir / "tokenizer.model"}"', "data.max_tokens=256",
                     "data.num_workers=1", f'data.cache_dir="{tmp_path / "cache"}"',
                     f'train.output_dir="{out}"',
                     "train.epochs=1", "train.eval_fraction=0.1", "train.eval_every=100", "train.log_every=5",
                     "train.save_every=0", "train.export=false", "lora.dropout=0.0", "lora.rank=8",
                     "lora.alpha=16", "train.lr=5e-3", f'lora.base_dtype="{base}"']
        assert main(["train", str(RECIPE), *[a for o in overrides for a in ("--set", o)]]) == 0
        losses[base] = _eval_losses(out)[-1]
    reference = json.loads((tmp_path / "float32" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["float32"] < 0.7 * reference  # LoRA learned the stories' shape
    assert losses["nf4"] <= 1.02 * losses["float32"], losses  # no more than 2 % worse
