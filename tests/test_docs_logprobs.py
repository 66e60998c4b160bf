"""docs/kernels-logprobs.md: its Python example runs, and so does every `packtune bench` command it
shows (at a tiny shape, packtune's side and the eager baseline only); a `make` target it names exists."""

import re
import shlex
import subprocess
from pathlib import Path

from packtune.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "kernels-logprobs.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def test_python_example_runs():
    (code,) = blocks("python")
    exec(compile(code, str(DOC), "exec"), {})


def test_commands_run(tmp_path, capsys):
    commands = [shlex.split(line) for block in blocks("bash") for line in block.splitlines() if line.strip()]
    assert {argv[0] for argv in commands} == {"packtune", "make"}
    for argv in commands:
        if argv[0] == "make":
            proc = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 0, proc.stderr
            continue
        assert argv[:3] == ["packtune", "bench", "logprobs"], argv
        tiny = ["--shape", "64", "32", "1000", "--impl", "packtune", "--repeats", "1"]
        assert main([*argv[1:], *tiny, "--out", str(tmp_path)]) == 0  # the bench measures in subprocesses
        out = capsys.readouterr().out
        assert "failed" not in out and (tmp_path / "logprobs.json").exists(), out
