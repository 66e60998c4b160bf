"""The loss curve: read from metrics.jsonl, drawn as a PNG or, without matplotlib, as text."""

import builtins
import json

import pytest

from packtune.demo.curve import read_losses, text_chart, write_curve


def _metrics(tmp_path, losses):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i + 1, "loss": v, "lr": 1e-3}) for i, v in enumerate(losses)]
    lines.insert(1, json.dumps({"step": 1, "eval_loss": 2.0}))
    lines.append(json.dumps({"step": len(losses) + 1, "loss": None}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_losses_skips_records_without_a_finite_loss(tmp_path):
    steps, losses = read_losses(_metrics(tmp_path, [3.0, 2.0, float("nan"), 1.0]))
    assert steps == [1, 2, 4]
    assert losses == [3.0, 2.0, 1.0]


def test_text_chart_puts_the_first_loss_top_left_and_the_last_bottom_right():
    chart = text_chart(list(range(1, 101)), [5.0 - 0.04 * i for i in range(100)], width=20, height=8)
    rows = chart.splitlines()
    assert rows[0].split("|")[1][0] == "*" and rows[7].split("|")[1][-1] == "*"
    assert rows[0].startswith("   4.920") and "step 1" in rows[-1] and "step 100" in rows[-1]
    assert text_chart([], []) == "(no loss values)"


def test_write_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = write_curve(_metrics(tmp_path, [3.0, 2.5, 2.0]).parent, tmp_path / "loss")
    assert path.name == "loss.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_write_curve_text_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = write_curve(_metrics(tmp_path, [3.0, 2.5, 2.0]).parent, tmp_path / "loss")
    assert path.name == "loss.txt" and "*" in path.read_text()
