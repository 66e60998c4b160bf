import warnings

import pytest

from packtune.config import dump_config, load_config
from packtune.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_and_overrides(tmp_path):
    path = write(tmp_path, '[model]\npath = "m"\n[train]\nlr = 1\nmax_steps = 5\n')
    cfg = load_config(path, ["train.lr=3e-4", "data.skip_bad_records=true", "data.template=chatml"])
    assert cfg.model.path == "m"
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 5
    assert cfg.data.skip_bad_records is True
    assert cfg.data.template == "chatml"


def test_renamed_key_still_works_and_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr("packtune.config.toml._warned_renames", set())
    path = write(tmp_path, "[data]\nskip_bad_rows = true\n")
    with pytest.warns(FutureWarning, match=r"run.toml: data.skip_bad_rows is now called data.skip_bad_rec"):
        assert load_config(path).data.skip_bad_records is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(None, ["data.skip_bad_rows=true"]).data.skip_bad_records is True
    assert "skip_bad_rows" not in dump_config(load_config(path))


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train.max_step; did you mean 'max_steps'"):
        load_config(write(tmp_path, "[train]\nmax_step = 3\n"))
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]; did you mean 'train'"):
        load_config(None, ["trian.lr=1"])


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_steps: expected int, got str"):
        load_config(write(tmp_path, '[train]\nmax_steps = "ten"\n'))
    with pytest.raises(ConfigError, match=r"data.max_tokens: expected int, got float"):
        load_config(None, ["data.max_tokens=1.5"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["lr=1"])


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[train\n"))


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ['model.path="a \\"quoted\\" dir"', "train.epochs=3"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
