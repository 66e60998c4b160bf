"""One live run per output directory: a second `packtune train` there is refused with one line naming
the first (with or without --overwrite, which then moves nothing), the first finishes intact; the
lock of a run that died is taken over."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import toy_training
from test_train_rundir import assets, snapshot, train, train_argv  # noqa: F401 - assets is a fixture

from packtune.runlock import LOCK_NAME, acquire, read_holder

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(toy_training.__file__)), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def test_a_second_run_is_refused_and_the_first_finishes_intact(tmp_path, assets, capsys):  # noqa: F811
    out = tmp_path / "run"
    first = start("pause_at=1", "cli", *train_argv(assets, out, "train.save_every=1"))
    paused = Path(f"{out}.paused")
    wait_for(paused, first)  # the first run is at step 1, holding the lock
    holder = read_holder(out)
    assert holder["pid"] == first.pid and "train" in holder["command"]
    before = snapshot(out)

    for flags in ((), ("--overwrite",)):
        assert train(assets, out, "train.save_every=1", flags=flags) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"packtune train: config error: train.output_dir: {out} is in use by another run (pid " \
               f"{first.pid} on {holder['host']}, started {holder['started']}: " in err
    assert not list(tmp_path.glob("run.replaced-*")) and snapshot(out) == before

    paused.unlink()
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stdout + stderr
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert read_holder(out) is None  # released: the file stays, empty


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, assets, capsys):  # noqa: F811
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from packtune.runlock import acquire; acquire(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(600)", str(out)],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    assert train(assets, out) == 2  # held
    assert "is in use by another run" in capsys.readouterr().err
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert train(assets, out) == 0
    stdout = capsys.readouterr().out
    assert f"{out}: took over the lock of a run that is gone (pid {holder.pid} on " in stdout
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_overwrite_takes_the_lock_along_to_the_new_directory(tmp_path, assets):  # noqa: F811
    out = tmp_path / "run"
    assert train(assets, out) == 0
    assert train(assets, out, "train.lr=1e-3", flags=["--overwrite"]) == 0
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / LOCK_NAME).read_text() == "" and (out / LOCK_NAME).read_text() == ""
    lock = acquire(out)  # free again
    lock.release()
