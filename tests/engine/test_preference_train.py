"""`packtune train` with a preference objective, end to end on a tiny Llama: each objective trains
and logs TRL's metric names in metrics.jsonl; the reference log-probs are computed once, cached and
read back; LoRA's reference is the base (the adapters start at zero); bad pairings of data and
objective stop with one line; docs/preference.md's worked example (SFT, then DPO) runs as written."""

import json
import math
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import toy_training
from data_fixtures import alpaca_rows, trained_tokenizers, write_jsonl
from preference_fixtures import pair_records
from toy_training import tiny_llama

from packtune.cli import main
from packtune.config import Config
from packtune.errors import ConfigError
from packtune.model.hf_io import save_pretrained

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "preference.md"
BASE = '[model]\npath = "unset"\n[data]\npath = "unset"\n[train]\n'


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference_train")
    (root / "base.toml").write_text(BASE)
    return {
        "root": root,
        "model": save_pretrained(tiny_llama(vocab=600), root / "model"),
        "tokenizer": trained_tokenizers(tmp_path_factory)["sp"],
        "pairs": write_jsonl(root / "pairs.jsonl", pair_records(16, "conversational", seed=1, max_words=6)),
        "alpaca": write_jsonl(root / "alpaca.jsonl", alpaca_rows(8, max_words=8)),
    }


def train(assets, out, *overrides, data="pairs", cache=None):
    """`packtune train` at toy size: (exit code, the metrics records)."""
    sets = [f'model.path="{assets["model"]}"', f'data.path="{assets[data]}"',
            f'data.tokenizer="{assets["tokenizer"]}"', 'data.template="alpaca"', "data.max_tokens=512",
            "data.num_workers=1", f'data.cache_dir="{cache or out.parent / "cache"}"',
            f'train.output_dir="{out}"', "train.max_steps=2", 'train.device="cpu"', "train.lr=1e-3",
            *overrides]
    code = main(["train", str(assets["root"] / "base.toml"), *[a for s in sets for a in ("--set", s)]])
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return code, records


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_each_objective_trains_and_logs_trl_s_metrics(assets, tmp_path, capsys, objective):
    code, records = train(assets, tmp_path / "run", f'train.objective="{objective}"', "preference.beta=0.1",
                          "train.eval_fraction=0.25", "train.eval_every=2")
    printed = capsys.readouterr().out
    assert code == 0
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    nll = ("nll_loss",) if objective == "orpo" else ()
    for r in steps:
        assert set(TRL_METRICS + nll) <= r.keys() and "nll_loss" not in r.keys() - set(nll)
        assert all(math.isfinite(r[k]) for k in TRL_METRICS + nll) and not r["skipped"]
    first = steps[0]
    if objective in ("dpo", "ipo"):  # step 1: the policy is the reference, every log-ratio is 0
        assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
        expected = math.log(2) if objective == "dpo" else (1 / (2 * 0.1)) ** 2
        assert math.isclose(first["loss"], expected, rel_tol=1e-6)
        assert "reference log-probs of 16 pairs (the policy as it starts): computed" in printed
    else:
        assert "reference log-probs" not in printed
    if objective == "orpo":  # the NLL term is part of the loss: loss > NLL
        assert first["loss"] > first["nll_loss"] > 0
    (evaluation,) = [r for r in records if "eval_loss" in r]
    assert 0 <= evaluation["eval_rewards/accuracies"] <= 1 and "eval_logps/chosen" in evaluation
    assert "preference pairs 16" in printed and "shared prompts:" in printed and "tokens saved" in printed
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_tensorboard_holds_the_preference_metrics(assets, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code, records = train(assets, out, 'train.objective="dpo"', 'train.report_to=["tensorboard"]',
                          "train.eval_fraction=0.25", "train.eval_every=2")
    assert code == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    accuracies = {e.step: e.value for e in events.Scalars("train/rewards/accuracies")}
    assert accuracies == {r["step"]: r["rewards/accuracies"] for r in records if "loss" in r}
    assert {f"train/{k}" for k in TRL_METRICS} | {"eval/rewards/accuracies"} <= set(events.Tags()["scalars"])


def test_reference_log_probs_are_cached_and_read_back(assets, tmp_path, capsys):
    cache = tmp_path / "cache"
    _, first = train(assets, tmp_path / "a", 'train.objective="dpo"', cache=cache)
    assert "computed, cached in" in capsys.readouterr().out
    (saved,) = list(cache.glob("*/reference-*.npy"))
    _, again = train(assets, tmp_path / "b", 'train.objective="dpo"', cache=cache)
    assert f"read from {saved}" in capsys.readouterr().out
    assert [r["loss"] for r in again] == [r["loss"] for r in first]
    train(assets, tmp_path / "c", 'train.objective="dpo"', "preference.shared_prompt=false", cache=cache)
    assert "computed, cached in" in capsys.readouterr().out  # another row layout: another key
    assert len(list(cache.glob("*/reference-*.npy"))) == 2


def test_lora_dpo_starts_from_the_base_as_its_reference(assets, tmp_path, capsys):
    code, records = train(assets, tmp_path / "run", 'train.objective="dpo"', "lora.rank=4", "lora.alpha=8")
    printed = capsys.readouterr().out
    assert code == 0 and "lora: rank 4" in printed
    assert math.isclose(records[0]["loss"], math.log(2), rel_tol=1e-6)  # B = 0: policy == base
    assert records[1]["rewards/chosen"] != 0.0  # the adapters moved the policy away from the base
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_data_and_objective_that_do_not_go_together_stop_with_one_line(assets, tmp_path, capsys):
    code, _ = train(assets, tmp_path / "a", 'train.objective="dpo"', data="alpaca")
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "train.objective = 'dpo' trains on preference records" in err
    code, _ = train(assets, tmp_path / "b")
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "set train.objective to dpo" in err


def worked_example() -> tuple[list[list[str]], str]:
    """(the commands of the bash blocks, the Python block) of docs/preference.md's worked example."""
    section = DOCS.read_text(encoding="utf-8").split("## Worked example")[1].split("\n## ")[0]
    bash = "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S)).replace("\\\n", " ")
    (python,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return [shlex.split(line, comments=True) for line in bash.splitlines() if line.strip()], python


def test_worked_example_sft_then_dpo(tmp_path, monkeypatch, capsys):
    """The page's commands in order: the demo (--quick: toy size), the Python block writing the pairs,
    then each `packtune train` (a few steps) on the SFT model the demo trained."""
    commands, python = worked_example()
    assert [c[:2] for c in commands] == [["packtune", "demo"], ["packtune", "train"], ["packtune", "eval"],
                                         ["packtune", "train"]]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(DOCS.parents[1] / "configs")
    assert main([*commands[0][1:], "--quick"]) == 0
    (tmp_path / "pairs.py").write_text(python, encoding="utf-8")
    runpy.run_path(str(tmp_path / "pairs.py"), run_name="__main__")
    shorter = ["train.max_steps=3", "data.num_workers=1", f'data.cache_dir="{tmp_path / "cache"}"']
    for command in commands[1:]:
        sets = [a for s in shorter for a in ("--set", s)] if command[1] == "train" else ["--limit", "12"]
        assert main([*command[1:], *sets]) == 0
    printed = capsys.readouterr().out
    assert "preference accuracy over 12 pairs" in printed
    assert_eval_log_probs_are_transformers(Path("runs/demo/dpo/final"), Path("runs/demo/dpo/preference.json"))
    assert "pairs in runs/demo/data/pairs.jsonl" in printed and "shared prompts:" in printed
    dpo = [json.loads(line) for line in Path("runs/demo/dpo/metrics.jsonl").read_text().splitlines()]
    simpo = [json.loads(line) for line in Path("runs/demo/simpo/metrics.jsonl").read_text().splitlines()]
    assert math.isclose(dpo[0]["loss"], math.log(2), rel_tol=1e-6)  # the SFT model is the reference
    assert [r["step"] for r in dpo if "loss" in r] == [1, 2, 3] and "rewards/margins" in simpo[0]
    assert Path("runs/demo/dpo/final/config.json").is_file()


def cli_argv(assets, out, cache, *overrides):
    sets = [f'model.path="{assets["model"]}"', f'data.path="{assets["pairs"]}"',
            f'data.tokenizer="{assets["tokenizer"]}"', 'data.template="alpaca"', "data.max_tokens=320",
            "data.num_workers=1", f'data.cache_dir="{cache}"', f'train.output_dir="{out}"', "train.lr=1e-3",
            'train.objective="dpo"', 'train.device="cpu"', *overrides]
    return ["train", str(assets["root"] / "base.toml"), *[a for s in sets for a in ("--set", s)]]


def history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_run_killed_after_a_checkpoint_resumes_identically(assets, tmp_path):
    """SIGKILL at step 5 (checkpoint at 3): the resumed run reads the cached reference log-probs and
    logs exactly the losses and rewards of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, toy_training.__file__]
    overrides = ("train.max_steps=6", "train.save_every=3")

    def run(*args):
        return subprocess.run([*script, *args], env=env, capture_output=True, text=True, timeout=300)

    reference = run("cli", *cli_argv(assets, tmp_path / "a", tmp_path / "cache", *overrides))
    assert reference.returncode == 0, reference.stderr
    killed = run("kill_at=5", "cli", *cli_argv(assets, tmp_path / "b", tmp_path / "cache", *overrides))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run("cli", *cli_argv(assets, tmp_path / "b", tmp_path / "cache", *overrides))
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 3" in resumed.stdout and "reference log-probs of 16 pairs" in resumed.stdout
    keys = ("step", "loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/rejected")
    expected = [[r.get(k) for k in keys] for r in history(tmp_path / "a")]
    assert len(expected) == 6 and [[r.get(k) for k in keys] for r in history(tmp_path / "b")] == expected


def test_two_ranks_train_dpo_as_one_process(assets, tmp_path):
    """torchrun, 2 FSDP2 ranks (gloo) of 1 micro-batch against one process of 2: the same reference
    log-probs (each rank scores its share) and the same steps."""
    one = tmp_path / "one"
    assert main(cli_argv(assets, one, tmp_path / "cache1", "train.max_steps=3", "train.micro_batches=2")) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "packtune", *cli_argv(assets, two, tmp_path / "cache2", "train.max_steps=3")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (ref_one,), (ref_two,) = (list((tmp_path / c).glob("*/reference-*.npy")) for c in ("cache1", "cache2"))
    np.testing.assert_allclose(np.load(ref_two), np.load(ref_one), rtol=1e-6)
    keys = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen")
    for a, b in zip(history(one), history(two), strict=True):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
        for k in keys:
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7), (a["step"], k, a[k], b[k])


@pytest.mark.parametrize("objective", ["dpo"])
def test_packtune_check_compares_pair_layouts(assets, tmp_path, capsys, objective):
    argv = cli_argv(assets, tmp_path / "run", tmp_path / "cache", f'train.objective="{objective}"')
    assert main(["check", *argv[1:]]) == 0
    out = capsys.readouterr().out
    assert f"micro-batches of 2 {objective} pairs" in out
    for line in ("packed pairs == padded pairs", "shared == unshared prompts", "2 micro-batches == 1 batch"):
        assert "PASS" in next(text for text in out.splitlines() if line in text)
    assert out.rstrip().endswith("packtune check: PASS") and not (tmp_path / "run").exists()


def assert_eval_log_probs_are_transformers(model_dir: Path, report: Path) -> None:
    """`packtune eval`'s per-pair log-probs against transformers' model on the same ids, side by side."""
    transformers = pytest.importorskip("transformers")
    import torch

    from packtune.config import DataConfig
    from packtune.data import prepare_dataset

    written = json.loads(report.read_text())
    data = DataConfig(path="runs/demo/data/pairs.jsonl", template="runs/demo/template.toml", num_workers=1)
    dataset = prepare_dataset(data, model_dir, use_cache=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    expected = []
    for sample in range(2 * written["pairs"]):
        ids, mask = (torch.from_numpy(a.astype(np.int64)) for a in dataset.sample(sample))
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, :-1]
        logp = logits.log_softmax(-1).gather(1, ids[1:, None])[:, 0]
        expected.append(float(logp[mask[1:].bool()].sum()))
    np.testing.assert_allclose(np.array(written["logps"]).reshape(-1), expected, rtol=1e-5)
    chosen, rejected = np.array(expected[0::2]), np.array(expected[1::2])
    assert written["preference_accuracy_summed"] == float(np.mean(chosen > rejected))


def test_qlora_dpo_trains_adapters_over_an_nf4_base(assets, tmp_path, capsys):
    pytest.importorskip("torchao")
    code, records = train(assets, tmp_path / "run", 'train.objective="dpo"', "lora.rank=4", "lora.alpha=8",
                          'lora.base_dtype="nf4"')
    printed = capsys.readouterr().out
    assert code == 0 and re.search(r"frozen base [0-9.]+ MiB \(nf4\)", printed)
    assert math.isclose(records[0]["loss"], math.log(2), rel_tol=1e-6)  # the reference is the same nf4 base
    assert records[1]["rewards/chosen"] != 0.0
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_mixture_of_experts_dpo_adds_the_router_losses(assets, tmp_path, capsys):
    from toy_training import tiny_moe

    moe = save_pretrained(tiny_moe(vocab=600, max_position_embeddings=512), tmp_path / "moe")
    code, records = train(assets, tmp_path / "run", 'train.objective="dpo"', f'model.path="{moe}"',
                          "train.router_z_loss=0.01")
    assert code == 0, capsys.readouterr().err
    assert math.isclose(records[0]["loss"] - 0.1 * records[0]["router_aux_loss"]
                        - 0.01 * records[0]["router_z_loss"], math.log(2), rel_tol=1e-5)
    assert all(name in records[1] for name in (*TRL_METRICS, "router_load_min"))


def test_context_parallelism_is_refused_for_the_objectives():
    cfg = Config()
    cfg.train.objective, cfg.train.context_parallel = "simpo", 2
    with pytest.raises(ConfigError, match="keeps each pair whole in one rank's row"):
        cfg.check_objective()
