"""`packtune bench memory` at a tiny shape: every setting computes the same step, the table, the ratios
against `none` and the fitted slope come out of one run, and bad arguments are one line."""

import json
import re

import numpy as np
import pytest

from packtune.bench import memory


def test_every_setting_computes_the_same_step(tmp_path):
    samples = memory.packed_samples(96, 40, vocab=256)  # 40 + 40 + 16 tokens: tiles of 32 cross samples
    losses = {setting: memory.packtune_step("full", setting, samples, memory.shape(2, 256), 32,
                                            str(tmp_path / setting))()
              for setting in memory.SETTINGS}
    assert all(np.isfinite(v) for v in losses.values()), losses
    assert max(losses.values()) - min(losses.values()) <= 1e-5 * abs(losses["none"]), losses


def test_trl_step_runs_padding_free_with_lora_and_checkpointing():
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    samples = memory.packed_samples(64, 40, vocab=256)
    assert np.isfinite(memory.trl_step("lora", "checkpointing", samples, memory.shape(1, 256))())


def test_one_run_prints_the_table_the_ratios_and_the_slope(tmp_path, capsys):
    memory.main(["--lengths", "64,128", "--sample-tokens", "48", "--layers", "1", "--vocab", "256",
                 "--modes", "full", "--impls", "packtune", "--settings", "none,offload", "--tile", "32",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "memory.json").read_text())
    assert [(r["setting"], r["tokens"]) for r in rows] == [("none", 64), ("none", 128), ("offload", 64),
                                                          ("offload", 128)]
    assert all(r["peak_bytes"] >= r["before_bytes"] > 0 and r["tokens_per_s"] > 0 for r in rows), rows
    by = {(r["setting"], r["tokens"]): r["loss"] for r in rows}
    for tokens in (64, 128):  # a fresh process per setting, the same step
        assert by["offload", tokens] == pytest.approx(by["none", tokens], rel=1e-5)
    assert "against packtune's `none` of the same mode and row length" in out
    assert re.search(r"^  packtune full  offload +128 +[\d.]+ +[\d.]+$", out, re.M), out
    assert f"floor of {memory.floor_bytes(1)} B/token" in out and "from 2 lengths" in out


def test_ratios_and_fit():
    rows = [{"impl": impl, "mode": "full", "setting": setting, "tokens": 100, "peak_bytes": peak,
             "tokens_per_s": speed}
            for impl, setting, peak, speed in (("packtune", "none", 400, 50.0),
                                               ("packtune", "tiled", 300, 40.0), ("trl", "none", 800, 25.0))]
    rows.append({"impl": "trl", "mode": "full", "setting": "checkpointing", "tokens": 100, "error": "over"})
    found = {(r["impl"], r["setting"]): (r["peak_ratio"], r["speed_ratio"]) for r in memory.ratios(rows)}
    assert found == {("packtune", "none"): (1.0, 1.0), ("packtune", "tiled"): (0.75, 0.8),
                     ("trl", "none"): (2.0, 0.5)}
    slope, intercept = memory.fit([(1000, 5000 + 3 * 1000), (2000, 5000 + 3 * 2000), (4000, 5000 + 3 * 4000)])
    assert slope == pytest.approx(3.0) and intercept == pytest.approx(5000.0)
    assert memory.fit([(1000, 1)]) is None


def test_unknown_setting_is_one_line():
    with pytest.raises(SystemExit, match="unknown setting, impl or mode in 'tiling'"):
        memory.main(["--settings", "tiling"])
