"""`packtune train`: configuration errors are caught before any work, with the field named."""

import pytest

from packtune.cli import main


@pytest.fixture
def paths(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return {"data": data, "model": model, "out": tmp_path / "run"}


def train(tmp_path, text, *overrides):
    config = tmp_path / "run.toml"
    config.write_text(text)
    return main(["train", str(config), *[arg for o in overrides for arg in ("--set", o)]])


def good_config(paths):
    """Valid paths; the [train] table comes last so a test can append keys to it."""
    return (f'[model]\npath = "{paths["model"]}"\n[data]\npath = "{paths["data"]}"\n'
            f'[train]\noutput_dir = "{paths["out"]}"\n')


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("max_step = 3\n", (), "unknown key train.max_step; did you mean 'max_steps'"),
        ("[trian]\nlr = 3\n", (), "unknown section [trian]; did you mean 'train'"),
        ("", ("train.micro_batch=2",), "unknown key train.micro_batch; did you mean 'micro_batches'"),
        ('lr = "fast"\n', (), "train.lr: expected float, got str 'fast'"),
        ("", ("train.epochs=2.5",), "train.epochs: expected int, got float 2.5"),
        ("", ("train.activation_checkpointing=1",), "train.activation_checkpointing: expected bool, got int"),
    ],
)
def test_unknown_keys_and_wrong_types(tmp_path, capsys, paths, text, overrides, message):
    assert train(tmp_path, good_config(paths) + text, *overrides) == 2
    err = capsys.readouterr().err
    assert "config error" in err and message in err


def test_missing_files_and_unwritable_output(tmp_path, capsys, paths):
    assert train(tmp_path, good_config(paths), f'data.path="{tmp_path}/nope.jsonl"') == 2
    assert f"data.path: {tmp_path}/nope.jsonl does not exist" in capsys.readouterr().err
    assert train(tmp_path, good_config(paths), f'model.path="{tmp_path}"') == 2
    assert "model.path" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train(tmp_path, good_config(paths), f'train.output_dir="{blocker}/run"') == 2
    assert f"train.output_dir: cannot write to {blocker}/run" in capsys.readouterr().err
    assert train(tmp_path, good_config(paths), "train.lr=0") == 2
    assert "train.lr must be > 0" in capsys.readouterr().err
    assert train(tmp_path, good_config(paths), 'train.resume="nowhere"') == 2
    assert "train.resume" in capsys.readouterr().err
    assert train(tmp_path, good_config(paths), "train.loss_weighting=samples") == 2
    assert "train.loss_weighting must be one of token, sample, turn, got 'samples'" in capsys.readouterr().err
