import json

import numpy as np
import pytest
from data_fixtures import alpaca_rows, trained_tokenizers, write_jsonl

from packtune.cli import main
from packtune.config import DataConfig
from packtune.data import prepare_dataset


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    return trained_tokenizers(tmp_path_factory)


@pytest.fixture
def cfg(tokenizers_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(300))
    return DataConfig(
        path=str(path), tokenizer=str(tokenizers_dir["sp"]), max_tokens=256, cache_dir=str(tmp_path / "cache")
    )


def same(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("tokens", "mask", "offsets", "lines"))


def test_cache_is_reused_and_invalidated_by_each_input(cfg, tokenizers_dir, tmp_path):
    first = prepare_dataset(cfg, num_workers=1)
    assert first.report["cache"] == "written" and isinstance(first.tokens, np.memmap)
    again = prepare_dataset(cfg, num_workers=1)
    assert again.report["cache"] == "hit" and again.cache_path == first.cache_path and same(first, again)
    variants = [
        DataConfig(**{**vars(cfg), "template": "chatml"}),
        DataConfig(**{**vars(cfg), "max_tokens": 200}),
        DataConfig(**{**vars(cfg), "train_on": "all"}),
    ]
    if "hf" in tokenizers_dir:
        variants.append(DataConfig(**{**vars(cfg), "tokenizer": str(tokenizers_dir["hf"])}))
    paths = {first.cache_path}
    for variant in variants:
        ds = prepare_dataset(variant, num_workers=1)
        assert ds.report["cache"] == "written"
        paths.add(ds.cache_path)
    assert len(paths) == 1 + len(variants)
    # Editing the data file (same name) invalidates too.
    write_jsonl(tmp_path / "d.jsonl", alpaca_rows(300, seed=1))
    edited = prepare_dataset(cfg, num_workers=1)
    assert edited.report["cache"] == "written" and edited.cache_path != first.cache_path


def test_workers_give_the_same_result(cfg, tmp_path):
    cfg.path = str(write_jsonl(tmp_path / "big.jsonl", alpaca_rows(2500)))
    one = prepare_dataset(cfg, num_workers=1, use_cache=False)
    two = prepare_dataset(cfg, num_workers=2, use_cache=False)
    assert same(one, two) and one.report["kept"] == two.report["kept"] == 2500 - one.report["dropped"].get(
        "too_long", 0
    )


def test_truncation_policy_counts_every_row(cfg):
    cfg.max_tokens = 120
    dropped = prepare_dataset(cfg, num_workers=1, use_cache=False)
    n_long = dropped.report["dropped"]["too_long"]
    assert n_long > 0 and dropped.report["kept"] + n_long == dropped.report["rows"] == 300
    assert dropped.lengths.max() <= 120 and not dropped.report["truncated"]
    cfg.truncation = "truncate"
    cut = prepare_dataset(cfg, num_workers=1, use_cache=False)
    counts = (
        cut.report["truncated"].get("too_long", 0),
        cut.report["dropped"].get("no_label_tokens_after_truncation", 0),
    )
    assert sum(counts) == n_long and counts[0] > 0
    assert cut.report["kept"] == 300 - counts[1] and cut.lengths.max() == 120
    assert (cut.label_counts > 0).all()


def test_prepare_command_prints_and_writes_the_report(cfg, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        f'[data]\npath = "{cfg.path}"\ntokenizer = "{cfg.tokenizer}"\nmax_tokens = 512\n'
        f'cache_dir = "{cfg.cache_dir}"\n[train]\nmicro_batches = 2\n'
    )
    out = tmp_path / "report.json"
    assert main(["prepare", str(config), "--set", "data.num_workers=1", "--report-json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in (
        "rows",
        "kept",
        "dropped",
        "truncated",
        "tokens",
        "label_tokens",
        "packing_efficiency",
        "steps_per_epoch",
    ):
        assert key in report
    assert report["rows"] == report["kept"] == 300 and report["steps_per_epoch"] == report["packed_rows"] // 2
    assert "efficiency" in capsys.readouterr().out
    assert main(["prepare", str(config), "--set", "data.path=missing.jsonl"]) == 2
    assert "data.path: missing.jsonl does not exist" in capsys.readouterr().err


def test_data_inspect_takes_records_and_still_the_old_rows_flag(cfg, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\npath = "{cfg.path}"\ntokenizer = "{cfg.tokenizer}"\n')
    assert main(["data", "inspect", str(config), "--records", "2"]) == 0
    new = capsys.readouterr()
    assert new.out.count(f"── {cfg.path}:") == 2 and new.err == ""
    assert main(["data", "inspect", str(config), "--rows", "2"]) == 0
    old = capsys.readouterr()
    assert old.out == new.out and old.err.count("--rows is now called --records") == 1
