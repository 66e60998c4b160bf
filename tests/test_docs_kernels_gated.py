"""docs/kernels-gated.md runs as written: its Python examples, and its `packtune bench` commands (at a
tiny shape, torch and packtune only: the table's full shape and torch.compile take minutes)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "kernels-gated.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


def _commands() -> list[str]:
    lines = [line.strip() for block in _blocks("bash") for line in block.splitlines()]
    table = re.findall(r"^\| `(packtune [^`]+)` \|", PAGE.read_text(), flags=re.M)
    return sorted({line for line in lines if line.startswith("packtune ")} | set(table))


def test_the_page_has_examples_and_commands():
    assert _blocks("python") and _commands()


@pytest.mark.parametrize("source", _blocks("python"))
def test_python_example_runs(source):
    exec(compile(source, str(PAGE), "exec"), {})


@pytest.mark.parametrize("command", _commands())
def test_bench_command_runs(command, tmp_path):
    tiny = ["--tokens", "3", "--intermediate", "37", "--repeats", "1", "--impl", "packtune",
            "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-P", "-m", *command.split(), *tiny], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"packtune\s+[\d.]+", proc.stdout), proc.stdout
