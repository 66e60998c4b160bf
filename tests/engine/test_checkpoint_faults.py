"""Damaged checkpoints and failed saves: a resume uses the newest checkpoint that verifies against its
manifest and names the ones it skips; a save that runs out of disk (or permission) leaves the earlier
checkpoints intact, no partial files, and one line, or with on_save_error = "continue" trains on."""

import errno
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystem
from toy_training import ListSampler, ToyLM, toy_steps

from packtune import manifest
from packtune.checkpoint import check_checkpoints, list_checkpoints
from packtune.cli import main
from packtune.config import TrainConfig
from packtune.errors import CheckpointError, StorageError
from packtune.parallel import init_distributed
from packtune.train import Trainer


def toy_trainer(out: Path, **overrides) -> Trainer:
    """3 epochs of 4 toy steps, a checkpoint every 2 steps (the newest 2 kept)."""
    cfg = TrainConfig(output_dir=str(out), epochs=3, lr=1e-2, warmup=2, save_every=2, seed=0, progress="none")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return Trainer(cfg, ToyLM(), ListSampler(toy_steps(4), shuffle=True), init_distributed("cpu"))


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(checkpoint: Path, name: str = "__0_0.distcp") -> None:
    data = (checkpoint / name).read_bytes()
    (checkpoint / name).write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    toy_trainer(out).fit()
    assert names(out) == ["step_00000010", "step_00000012"]
    return out


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one_named(tmp_path, finished, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for step in ("step_00000010", "step_00000012"):
        (out / "checkpoints" / step).mkdir()
        for f in (finished / "checkpoints" / step).iterdir():
            (out / "checkpoints" / step / f.name).write_bytes(f.read_bytes())
    truncate(out / "checkpoints" / "step_00000012")
    (out / "metrics.jsonl").write_bytes((finished / "metrics.jsonl").read_bytes())

    trainer = toy_trainer(out)
    assert trainer.resume().name == "step_00000010" and trainer.step == 10
    stdout = capsys.readouterr().out
    assert "skipped checkpoint step_00000012: __0_0.distcp holds" in stdout and "the manifest says" in stdout
    trainer.fit()
    assert losses(out) == losses(finished)  # steps 11 and 12 redone exactly


def test_changed_bytes_of_the_same_size_are_found(tmp_path, finished):
    checkpoint = tmp_path / "step_00000012"
    checkpoint.mkdir()
    for f in (finished / "checkpoints" / "step_00000012").iterdir():
        (checkpoint / f.name).write_bytes(f.read_bytes())
    data = bytearray((checkpoint / "extra_rank0.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (checkpoint / "extra_rank0.pt").write_bytes(bytes(data))
    expected = "extra_rank0.pt has other contents than were saved (CRC-32 mismatch)"
    assert manifest.verify(checkpoint) == expected
    assert manifest.verify(checkpoint, part=None) is None  # sizes alone cannot tell


def test_every_checkpoint_damaged_is_one_clear_error_and_nothing_is_deleted(tmp_path, finished, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for f in finished.rglob("*"):
        target = out / f.relative_to(finished)
        target.mkdir(exist_ok=True) if f.is_dir() else target.write_bytes(f.read_bytes())
    truncate(out / "checkpoints" / "step_00000012")
    (out / "checkpoints" / "step_00000010" / "manifest.json").unlink()
    (out / "checkpoints" / "step_00000010" / ".metadata").unlink()
    before = snapshot(out)
    with pytest.raises(CheckpointError) as raised:
        toy_trainer(out).resume()
    message = str(raised.value)
    assert "\n" not in message and "no checkpoint in" in message and "nothing was deleted" in message
    assert "step_00000012: __0_0.distcp holds" in message and "step_00000010: no manifest.json" in message
    assert snapshot(out) == before
    assert "skipped checkpoint step_00000012" in capsys.readouterr().out

    assert main(["check-checkpoint", str(out)]) == 1
    report = capsys.readouterr().out.splitlines()
    assert report[0].startswith(f"{out / 'checkpoints' / 'step_00000012'}: DAMAGED: __0_0.distcp holds")
    assert report[1] == f"{out / 'checkpoints' / 'step_00000010'}: DAMAGED: no manifest.json"
    assert report[2] == "no checkpoint verifies: a resume would stop with an error, deleting nothing"


def test_check_checkpoint_reports_a_sound_run(finished, capsys):
    assert main(["check-checkpoint", str(finished / "checkpoints")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(finished / "checkpoints" / s)
                                                       for s in ("step_00000012", "step_00000010")]
    assert all(": ok (3 files, " in line and "CRC-32 verified)" in line for line in lines)
    lines, ok = check_checkpoints(finished / "checkpoints" / "step_00000010")
    assert ok and len(lines) == 1


@contextmanager
def full_disk_at(monkeypatch, step: int, after_bytes: int = 100):
    """DCP's file writer runs out of space while writing checkpoint `step` (after `after_bytes`)."""
    original = FileSystem.create_stream

    class FullStream:
        def __init__(self, stream):
            self.stream, self.written = stream, 0

        def write(self, data):
            if self.written + len(data) > after_bytes:
                self.stream.write(bytes(data)[: after_bytes - self.written])
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.stream.write(data)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    @contextmanager
    def create_stream(self, path, mode):
        with original(self, path, mode) as stream:
            yield FullStream(stream) if f"step_{step:08d}" in str(path) else stream

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    yield


def test_a_full_disk_at_save_keeps_the_previous_checkpoint_and_no_partial_files(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = toy_trainer(out, keep_checkpoints=1)
    with full_disk_at(monkeypatch, 4), pytest.raises(StorageError) as raised:
        trainer.fit()
    message = str(raised.value)
    where = out / "checkpoints"
    assert message.startswith(f"cannot save checkpoint step_00000004: {where}: no space left on the device (")
    assert "free space there or set train.output_dir to a larger disk" in message
    assert message.endswith("the previous checkpoint step_00000002 is intact") and "\n" not in message
    assert names(out) == ["step_00000002"]
    assert manifest.verify(out / "checkpoints" / "step_00000002") is None


def test_on_save_error_continue_trains_on_and_saves_at_the_next_checkpoint(tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    toy_trainer(reference).fit()
    out = tmp_path / "run"
    trainer = toy_trainer(out, on_save_error="continue")
    with full_disk_at(monkeypatch, 4):
        assert trainer.fit() == 12
    stdout = capsys.readouterr().out
    assert "step 4: cannot save checkpoint step_00000004:" in stdout and "the next save tries again" in stdout
    assert names(out) == ["step_00000010", "step_00000012"]
    assert [manifest.verify(p) for p in list_checkpoints(out)] == [None, None]
    assert losses(out) == losses(reference)


def test_the_only_verified_checkpoint_survives_a_failed_save_of_the_same_step(tmp_path, monkeypatch):
    """keep = 1, and step 4 saved again (a stop signal right after its save) into a full disk: the
    checkpoint there is replaced only once the new one is complete, so it is still there."""
    out = tmp_path / "run"
    trainer = toy_trainer(out, keep_checkpoints=1, epochs=1)
    trainer.fit()
    assert names(out) == ["step_00000004"]
    before = snapshot(out / "checkpoints")
    with full_disk_at(monkeypatch, 4), pytest.raises(StorageError, match="step_00000004 is intact"):
        trainer.save()
    assert snapshot(out / "checkpoints") == before
