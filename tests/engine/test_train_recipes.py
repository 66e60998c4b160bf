"""Each example config in configs/ trains for 2 steps at tiny scale through `packtune train`.

The recipes' own settings (template, format, micro-batches, activation checkpointing, ...) are
kept; `--set` only swaps in a tiny random Llama, a tiny sentencepiece tokenizer, a few generated
rows, a short context and 2 steps.
"""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import toy_training
from data_fixtures import alpaca_rows, random_text, trained_tokenizers, write_jsonl
from toy_training import tiny_llama

from packtune.cli import main
from packtune.config import load_config
from packtune.data.tokenizer import load_tokenizer
from packtune.model.hf_io import load_pretrained, save_pretrained

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def sharegpt_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns.append({"from": "human", "value": random_text(rng, rng.randint(2, 12))})
            turns.append({"from": "gpt", "value": random_text(rng, rng.randint(2, 15))})
        rows.append({"conversations": turns})
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    return {
        "model": save_pretrained(tiny_llama(vocab=600), root / "model"),
        "tokenizer": trained_tokenizers(tmp_path_factory)["sp"],
        "alpaca": write_jsonl(root / "alpaca.jsonl", alpaca_rows(48, max_words=20)),
        "sharegpt": write_jsonl(root / "sharegpt.jsonl", sharegpt_rows(160)),
    }


@pytest.mark.parametrize(
    ("name", "data", "extra"),
    [("demo", "alpaca", []), ("alpaca_llama_7b", "alpaca", []), ("vicuna_llama_7b", "sharegpt", []),
     ("vicuna_llama_7b", "sharegpt", ['train.loss_weighting="turn"'])],
    ids=["demo", "alpaca", "vicuna", "vicuna-turn-weighting"],
)
def test_recipe_trains_two_steps(tmp_path, assets, capsys, name, data, extra):
    config = CONFIGS / f"{name}.toml"
    out = tmp_path / "run"
    overrides = [*extra,
        f'model.path="{assets["model"]}"',
        f'data.path="{assets[data]}"',
        f'data.tokenizer="{assets["tokenizer"]}"',
        "data.max_tokens=512",
        "data.num_workers=1",
        f'data.cache_dir="{tmp_path / "cache"}"',
        f'train.output_dir="{out}"',
        "train.max_steps=2",
        'train.device="cpu"',
    ]
    assert main(["train", str(config), *[a for o in overrides for a in ("--set", o)]]) == 0
    stdout = capsys.readouterr().out
    assert "records read" in stdout and "step 2/2" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    assert all(r["loss"] > 0 and r["label_tokens"] > 0 and not r["skipped"] for r in train_records)
    resolved = load_config(out / "config.toml")
    recipe = load_config(config)
    assert resolved.data.template == recipe.data.template and resolved.train.lr == recipe.train.lr
    assert resolved.train.micro_batches == recipe.train.micro_batches
    assert resolved.train.loss_weighting == ("turn" if extra else "token")
    assert load_pretrained(out / "final").args.vocab_size == 600
    exported, original = load_tokenizer(out / "final"), load_tokenizer(assets["tokenizer"])
    assert exported.encode_text("hello world") == original.encode_text("hello world")


def test_cli_run_killed_after_checkpoint_resumes_identically(tmp_path, assets):
    """The real pipeline end to end: PackedSampler position, scheduler, optimizer and RNG survive
    a SIGKILL, and the resumed run logs exactly the losses of an uninterrupted one."""
    overrides = [
        f'model.path="{assets["model"]}"', f'data.path="{assets["alpaca"]}"',
        f'data.tokenizer="{assets["tokenizer"]}"', "data.max_tokens=256", "data.num_workers=1",
        f'data.cache_dir="{tmp_path / "cache"}"', "train.epochs=2", "train.save_every=3", "train.log_every=2",
        'train.device="cpu"', "train.eval_fraction=0.1", "train.eval_every=4",
    ]

    def argv(out):
        return ["train", str(CONFIGS / "demo.toml"), *[a for o in overrides for a in ("--set", o)],
                "--set", f'train.output_dir="{out}"']

    def history(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, toy_training.__file__]
    def run(*args):
        return subprocess.run([*script, *args], env=env, capture_output=True, text=True, timeout=300)

    reference = run("cli", *argv(tmp_path / "a"))
    assert reference.returncode == 0, reference.stderr
    killed = run("kill_at=8", "cli", *argv(tmp_path / "b"))  # checkpoints at 3 and 6
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run("cli", *argv(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 6" in resumed.stdout
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "label_tokens", "eval_loss")
    expected = [[r.get(k) for k in keys] for r in history(tmp_path / "a")]
    assert len(expected) > 8 and any(r[-1] is not None for r in expected)
    assert [[r.get(k) for k in keys] for r in history(tmp_path / "b")] == expected


def test_torchrun_two_ranks(tmp_path, assets):
    """`torchrun --nproc_per_node 2 -m packtune train ...`: FSDP2 over gloo, one metrics file."""
    out = tmp_path / "run"
    overrides = [
        f'model.path="{assets["model"]}"', f'data.path="{assets["alpaca"]}"',
        f'data.tokenizer="{assets["tokenizer"]}"', "data.max_tokens=256", "data.num_workers=1",
        f'data.cache_dir="{tmp_path / "cache"}"', f'train.output_dir="{out}"', "train.max_steps=3",
        "train.save_every=2",
    ]
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "packtune", "train", str(CONFIGS / "demo.toml"), *sets]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert proc.stdout.count("records read") == 1  # the data report comes from rank 0 only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000003").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    assert load_pretrained(out / "final").args.vocab_size == 600
