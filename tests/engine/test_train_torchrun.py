"""`packtune train` under torchrun (2 gloo ranks on the CPU), end to end through the command line:
a run killed after a checkpoint resumes in one process with twice the micro-batches and gives the
uninterrupted run's losses; a rank killed mid-run makes the other stop with a message, not hang."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toy_training
from test_train_rundir import assets, train, train_argv  # noqa: F401 - assets is a fixture

from packtune.manifest import read_manifest, verify

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN = ("train.max_steps=4", "train.save_every=2", "train.micro_batches=1", "train.progress='line'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 toy_training.py ARGS` (hooks, then `cli train ...`)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(Path(toy_training.__file__)), *args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_ranks_killed_after_a_checkpoint_resume_in_one_process(tmp_path, assets, capsys):  # noqa: F811
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    procs = {out: torchrun(*hooks, "cli", *train_argv(assets, out, *RUN))
             for out, hooks in ((whole, ()), (killed, ("kill_at=3",)))}
    for out, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == (0 if out == whole else 1), stdout + stderr
        if out == whole:
            assert stdout.rstrip().splitlines()[-1].startswith("done: 4 steps"), stdout
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_00000002"]
    assert json.loads((killed / "run.json").read_text())["world_size"] == 2
    # The sharded checkpoint's manifest lists both ranks' files, and they verify.
    listed = read_manifest(killed / "checkpoints" / "step_00000002")
    assert {"__0_0.distcp", "__1_0.distcp", "extra_rank0.pt", "extra_rank1.pt", ".metadata"} <= set(listed)
    assert verify(killed / "checkpoints" / "step_00000002") is None

    # Its own config (1 micro-batch) on 1 rank splits the rows for another world_size x micro_batches.
    assert train(assets, killed, *RUN) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "on 1 rank resume with train.micro_batches = 2" in err

    assert train(assets, killed, *RUN[:2], "train.micro_batches=2", *RUN[3:]) == 0
    assert "at step 2" in capsys.readouterr().out
    a, b = losses(whole), losses(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(a[step] - b[step]) <= 1e-5 * a[step], (step, a[step], b[step])
    assert json.loads((killed / "run.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_a_killed_rank_makes_the_other_stop_with_a_message(tmp_path, assets):  # noqa: F811
    """Two ranks started as torchrun would (its environment), without torchrun's agent, which would
    end the other rank itself: rank 1 is SIGKILLed after step 2, and rank 0 stops on its own, with
    one line naming rank 1, within 60 s."""
    out, port = tmp_path / "run", str(free_port())
    argv = train_argv(assets, out, "train.max_steps=1000", "train.micro_batches=1")
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        command = [sys.executable, toy_training.__file__, "kill_at=2", "kill_rank=1", "cli", *argv]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        _, stderr1 = procs[1].communicate(timeout=300)
        assert procs[1].returncode == -signal.SIGKILL, stderr1
        killed = time.monotonic()
        stdout, stderr = procs[0].communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode == 1, stdout + stderr
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"packtune train: training error: rank 0: rank 1 (pid {procs[1].pid}) ended: ")
    assert stderr.rstrip().endswith("stopping this rank too. The newest checkpoint resumes the run"), stderr
