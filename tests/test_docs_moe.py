"""docs/moe-kernels.md runs as written: its Python blocks, and its `packtune bench moe` commands with
tiny-shape options appended (argparse keeps the last value; `--impl` adds packtune) on layers of 4
experts, each measurement in this process rather than a fresh one (a subprocess costs seconds)."""

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

from packtune import cli
from packtune.bench import harness, moe

DOC = (Path(__file__).resolve().parent.parent / "docs" / "moe-kernels.md").read_text()
COMMANDS = [line for block in re.findall(r"```bash\n(.*?)```", DOC, re.S) for line in block.splitlines()
            if line.strip()]


def test_python_blocks_run():
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", DOC, re.S):
        exec(compile(block, "docs/moe-kernels.md", "exec"), namespace)
    assert namespace["y"].shape == (6, 16)


def _in_process(factory, impl, shape, dtype, device, warmup, repeats, timeout=None):
    module, func = factory.split(":")
    step = getattr(importlib.import_module(module), func)(impl, shape, dtype, device)
    return harness.measure(step, device, warmup, repeats)


@pytest.mark.parametrize("command", COMMANDS)
def test_bench_commands_run(command, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    argv = shlex.split(command)
    while "=" in argv[0]:  # VAR=value before the command
        name, value = argv.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    assert argv[:3] == ["packtune", "bench", "moe"]
    monkeypatch.setattr(harness, "run_in_subprocess", _in_process)
    for model in moe.MODELS:  # widths (after --scale 8) of 8 elements: torch._grouped_mm's 16-byte strides
        monkeypatch.setitem(moe.MODELS, model, {"hidden": 128, "inter": 64, "experts": 4, "top_k": 2})
    tiny = ["--tokens", "8", "--scale", "8", "--repeats", "1", "--warmup", "1", "--impl", "packtune",
            "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main([*argv[1:], *tiny]) == 0
    rows = json.loads((tmp_path / "moe.json").read_text())
    assert "packtune" in {r["implementation"] for r in rows}
    assert all("median_s" in r for r in rows)
