"""docs/t5.md's examples run as a reader would run them: each ```python block as a script in a fresh
folder, each `packtune bench` line through that subject's own argument parser (stopped once parsed:
the measurement itself takes minutes); tests/test_docs_examples.py checks the other commands."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import pytest

from packtune.bench import e2e, harness, t5_attention

PAGE = Path(__file__).resolve().parents[2] / "docs" / "t5.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_example_runs(tmp_path, monkeypatch, index):
    script = tmp_path / "example.py"
    script.write_text(_blocks("python")[index])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")


def test_bench_commands_parse(monkeypatch):
    """The `packtune bench` lines (tests/test_docs_examples.py checks the other commands)."""
    lines = [line for block in _blocks("bash") for line in block.splitlines()
             if line.startswith("packtune bench")]
    assert lines
    parsed = []
    monkeypatch.setattr(harness, "run_table", lambda *args, **kwargs: parsed.append(args))
    for line in lines:
        words = shlex.split(line)
        if words[2] == "e2e":  # a whole training run per side: its options parse, and it names a T5
            assert e2e.build_parser().parse_args(words[3:]).model == ["t5"], line
            parsed.append(words)
            continue
        assert words[:3] == ["packtune", "bench", "t5-attention"], line
        t5_attention.main(words[3:])
    assert len(parsed) == len(lines)
