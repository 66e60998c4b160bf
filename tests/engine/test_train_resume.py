"""Checkpoints survive SIGKILL (after and during a save) and SIGTERM stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import toy_training

SCRIPT = Path(toy_training.__file__)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, check_rc=0):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc.stdout


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def checkpoints(output_dir):
    return sorted(p.name for p in (Path(output_dir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run (3 epochs x 4 steps), in this process."""
    out = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        toy_training.run_toy(str(out), {})
    finally:
        torch.set_num_threads(threads)
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    return records


def same_history(a, b):
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "label_tokens")
    return [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_sigkill_after_checkpoint_then_resume_matches(tmp_path, uninterrupted):
    # Checkpoints at steps 2, 4, 6, 8 (the end of epoch 2); killed after step 9 was logged.
    run("kill_at=9", tmp_path, check_rc=-signal.SIGKILL)
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 10))
    assert checkpoints(tmp_path) == ["step_00000006", "step_00000008"]  # keep_checkpoints = 2
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "loss": 3.')  # as if killed in the middle of a write
    out = run(tmp_path)
    assert "resumed from step_00000008" in out
    assert same_history(metrics(tmp_path), uninterrupted)  # bit-identical, step 9 redone once


def test_killed_while_writing_checkpoint_resumes_from_previous(tmp_path, uninterrupted):
    run("kill_during_save=6", tmp_path, check_rc=-signal.SIGKILL)
    assert checkpoints(tmp_path) == ["step_00000002", "step_00000004", "step_00000006.tmp"]
    out = run(tmp_path)
    assert "resumed from step_00000004" in out
    assert same_history(metrics(tmp_path), uninterrupted)
    assert checkpoints(tmp_path) == ["step_00000010", "step_00000012"]


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "epochs=1000", "save_every=0"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    last = metrics(tmp_path)[-1]["step"]
    assert 3 <= last < 4000
    assert f"stop requested: saved step {last}" in stdout
    assert checkpoints(tmp_path) == [f"step_{last:08d}"]
    extra = torch.load(tmp_path / "checkpoints" / f"step_{last:08d}" / "extra_rank0.pt", weights_only=True)
    assert extra["step"] == last and extra["sampler"]["index"] == (last - 1) % 4 + 1
