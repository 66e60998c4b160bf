"""Run visibility: TensorBoard event files and an offline W&B run hold the metrics.jsonl values
(read back with their own readers), the progress bar / line / quiet modes, and `packtune plot`."""

import io
import json
from pathlib import Path

import pytest
import torch
from data_fixtures import alpaca_rows, trained_tokenizers, write_jsonl
from toy_training import tiny_llama

from packtune.cli import main
from packtune.metrics import MetricsLogger
from packtune.model.hf_io import save_pretrained

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("visibility")
    return {
        "model": save_pretrained(tiny_llama(vocab=600), root / "model"),
        "tokenizer": trained_tokenizers(tmp_path_factory)["sp"],
        "data": write_jsonl(root / "alpaca.jsonl", alpaca_rows(32, max_words=20)),
    }


def train(assets, out: Path, *extra: str) -> list[dict]:
    overrides = [
        f'model.path="{assets["model"]}"', f'data.path="{assets["data"]}"',
        f'data.tokenizer="{assets["tokenizer"]}"', "data.max_tokens=256", "data.num_workers=1",
        f'data.cache_dir="{out.parent / "cache"}"', f'train.output_dir="{out}"', "train.max_steps=3",
        'train.device="cpu"', "train.eval_fraction=0.2", "train.eval_every=3", *extra,
    ]
    assert main(["train", str(CONFIG), *[a for o in overrides for a in ("--set", o)]]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_and_wandb_hold_the_metrics(assets, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    records = train(assets, out, 'train.report_to=["tensorboard", "wandb"]')
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert losses.keys() == expected.keys()
    assert all(abs(losses[s] - expected[s]) <= 1e-6 * abs(expected[s]) for s in expected)
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_gib", "eval/loss"} <= set(
        events.Tags()["scalars"])
    assert "config" in "".join(events.Tags()["tensors"])  # the resolved config, as text
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_report_to_unknown_is_a_config_error(assets, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", str(CONFIG), "--set", f'model.path="{assets["model"]}"', "--set",
            f'data.path="{assets["data"]}"', "--set", f'train.output_dir="{out}"',
            "--set", 'train.report_to=["tensorbord"]']
    assert main(argv) == 2
    assert "unknown reporter 'tensorbord'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("progress", ["bar", "line", "none"])
def test_progress_modes(progress):
    stream = io.StringIO()
    logger = MetricsLogger(None, 4, 1, None, torch.device("cpu"), stream=stream, progress=progress)
    logger.path = Path("/dev/null")
    for step in (1, 2):
        logger.record(step, 1e-3, 100, 50, 0.0, torch.tensor([2.5, 1.0, 1.0]))
    logger.flush()
    logger.close()
    text = stream.getvalue()
    if progress == "bar":
        assert "2/4" in text and "loss 2.5000" in text
    elif progress == "line":
        assert text.startswith("step 2/4 | loss 2.5000")
    else:
        assert text == ""


def test_plot_two_runs(assets, tmp_path):
    pytest.importorskip("matplotlib")
    a, b = tmp_path / "a", tmp_path / "b"
    train(assets, a)
    train(assets, b, "train.lr=1e-3")
    png = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "nope"), "--out", str(png)]) == 2
