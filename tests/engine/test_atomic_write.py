"""Whole-file rewrites (run.json, config.toml, the data tools' files, metrics.jsonl on resume) are atomic:
a failure during the write leaves the old file whole and no temporary file behind."""

import json
import os

import pytest

from packtune.atomic_write import write_atomic
from packtune.metrics import truncate_metrics


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "sub" / "run.json", "old\n")
    assert path.read_text() == "old\n"

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # the last line cut short by a kill
    truncate_metrics(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        truncate_metrics(path, 1)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    truncate_metrics(tmp_path / "absent.jsonl", 0)
    assert not (tmp_path / "absent.jsonl").exists()
