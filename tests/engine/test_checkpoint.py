"""Checkpoint files: round trip, completeness, retention, and no code execution on load."""

import pickle

import pytest
import torch
from toy_training import ToyLM

from packtune.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from packtune.errors import CheckpointError
from packtune.kernels import PackedLayout
from packtune.optim import build_optimizer
from packtune.parallel import init_distributed


def model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = ToyLM()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    loss = model.lm_head(model.hidden_states(torch.arange(5), PackedLayout.packed([5]))).square().mean()
    loss.backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    dist_ctx = init_distributed("cpu")
    model, optimizer = model_and_optimizer(0)
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 7, dist_ctx, model, optimizer, {"sampler": {"index": 3}, "epoch": 1})
    expected_draw = torch.rand(3)
    other, other_opt = model_and_optimizer(1)
    extra = load_checkpoint(path, dist_ctx, other, other_opt)
    assert extra["step"] == 7 and extra["sampler"] == {"index": 3} and extra["epoch"] == 1
    assert torch.equal(torch.rand(3), expected_draw)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[a][key], other_opt.state[b][key])
    assert [g["weight_decay"] for g in other_opt.param_groups] == [0.1, 0.0]
    assert tuple(other_opt.param_groups[0]["betas"]) == (0.9, 0.95)


def test_incomplete_and_old_checkpoints(tmp_path):
    dist_ctx = init_distributed("cpu")
    model, optimizer = model_and_optimizer(0)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, dist_ctx, model, optimizer, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    (tmp_path / "checkpoints" / "step_00000008.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000006"
    save_checkpoint(tmp_path, 10, dist_ctx, model, optimizer, {}, keep=0)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000006", "step_00000010"]  # .tmp removed, none pruned
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoints", dist_ctx, model, optimizer)


class Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_metadata_pickle_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dist_ctx = init_distributed("cpu")
    model, optimizer = model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 1, dist_ctx, model, optimizer, {})
    (path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="builtins.exec, which is not allowed"):
        load_checkpoint(path, dist_ctx, model, optimizer)
    assert not (tmp_path / "PWNED").exists()
