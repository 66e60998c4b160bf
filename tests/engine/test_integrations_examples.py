"""The examples in examples/ run (a few steps each, on CPU, no download)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("script, needs", [("hf_trainer.py", "accelerate"), ("plain_loop.py", None)])
def test_example_runs(script, needs):
    if needs:
        pytest.importorskip(needs)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "2"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss'?:? '?([0-9]+\.[0-9]+)", result.stdout)]
    assert losses and all(0 < loss < 20 for loss in losses), result.stdout[-2000:]


@pytest.mark.parametrize("impl", ["transformers", "packtune"])
def test_hf_step_bench_runs(impl):
    pytest.importorskip("transformers")
    from packtune.bench import hf_step

    step = hf_step.make_step(
        impl, {"T": 64, "samples": 4, "vocab": 300, "hidden": 128, "layers": 1}, "float32", "cpu"
    )
    step()
    step()
