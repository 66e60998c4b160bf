"""`packtune train` meets damaged checkpoints and a full disk at the export: one line, a non-zero exit,
nothing half-written, nothing deleted; the same command then finishes the run."""

import json
from pathlib import Path

from safetensors import SafetensorError
from test_train_rundir import assets, snapshot, train  # noqa: F401 - assets is a fixture

import packtune.model.hf_io as hf_io


def unfinish(out: Path) -> None:
    """As if the run was stopped after its last checkpoint, before the export."""
    (out / "run.json").write_text('{"status": "running"}')
    for f in (out / "final").iterdir():
        f.unlink()
    (out / "final").rmdir()


def test_every_checkpoint_damaged_stops_with_one_line_and_deletes_nothing(tmp_path, assets, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert train(assets, out, "train.save_every=1") == 0
    unfinish(out)
    for step in (1, 2):
        shard = out / "checkpoints" / f"step_{step:08d}" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
    before = {k: v for k, v in snapshot(out).items() if k.startswith("checkpoints")}
    capsys.readouterr()
    assert train(assets, out, "train.save_every=1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("packtune train: checkpoint error: no checkpoint in ")
    assert "step_00000002: __0_0.distcp holds 100 bytes" in err and "nothing was deleted" in err
    assert {k: v for k, v in snapshot(out).items() if k.startswith("checkpoints")} == before


def test_a_full_disk_at_the_export_leaves_no_partial_final(tmp_path, assets, capsys, monkeypatch):  # noqa: F811
    def full_disk(data, path, metadata=None):
        Path(path).write_bytes(b"\0" * 64)  # the part that fitted
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "run"
    monkeypatch.setattr(hf_io, "save_file", full_disk)
    assert train(assets, out, "train.save_every=1") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"packtune train: storage error: cannot export the model: {out}: no space left "
                          "on the device (")
    assert err.rstrip().endswith("the run's last checkpoint step_00000002 is kept: the same command again "
                                 "resumes from it and exports")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.toml", "metrics.jsonl",
                                                     "run.json", "run.lock"]
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    monkeypatch.undo()
    assert train(assets, out, "train.save_every=1") == 0
    stdout = capsys.readouterr().out
    assert "at step 2" in stdout and f"final model: {out / 'final'}" in stdout
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
