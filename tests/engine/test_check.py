"""`packtune check CONFIG`: the three loss equalities on a user's config and data, and the token-id
check that runs before step 1."""

import os
import subprocess
import sys

from test_train_recipes import CONFIGS, assets  # noqa: F401  (the module-scoped fixture)
from toy_training import tiny_llama

from packtune.cli import main
from packtune.model.hf_io import save_pretrained


def overrides(assets, tmp_path, model=None):  # noqa: F811
    sets = [f'model.path="{model or assets["model"]}"', f'data.path="{assets["alpaca"]}"',
            f'data.tokenizer="{assets["tokenizer"]}"', "data.max_tokens=256", "data.num_workers=1",
            f'data.cache_dir="{tmp_path / "cache"}"', f'train.output_dir="{tmp_path / "run"}"',
            'train.device="cpu"']
    return [a for o in sets for a in ("--set", o)]


def test_check_prints_each_comparison_and_passes(tmp_path, assets, capsys):  # noqa: F811
    assert main(["check", str(CONFIGS / "demo.toml"), *overrides(assets, tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("packed == unpacked", "2 micro-batches == 1 batch"):
        assert line in out and "loss rel diff" in out
        assert "PASS" in next(text for text in out.splitlines() if line in text)
    assert "1 ranks == 1 process" in out and "SKIP" in out
    assert "cp=2 == cp=1                 SKIP (run under torchrun with an even number of ranks)" in out
    assert out.rstrip().endswith("packtune check: PASS")
    assert not (tmp_path / "run").exists()  # a check writes no run


def test_check_under_torchrun_compares_ranks(tmp_path, assets):  # noqa: F811
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "packtune", "check", str(CONFIGS / "demo.toml"), *overrides(assets, tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("2 ranks == 1 process", "cp=2 == cp=1"):
        line = next(line for line in proc.stdout.splitlines() if name in line)
        assert "PASS" in line and "loss rel diff" in line, proc.stdout
    assert "packtune check: PASS" in proc.stdout


def test_token_ids_past_the_vocabulary_are_refused_before_step_1(tmp_path, assets, capsys):  # noqa: F811
    small = save_pretrained(tiny_llama(vocab=37), tmp_path / "small")
    argv = ["train", str(CONFIGS / "demo.toml"), *overrides(assets, tmp_path, model=small)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "vocab_size is 37" in err and "token id" in err and "vocabulary of at least" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
