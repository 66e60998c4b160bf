"""`packtune train` runs 2 steps on each supported family through the normal config (configs/demo.toml).

Each model is a tiny random transformers checkpoint written by `save_pretrained` (model_fixtures),
with vocab 600 to match the sentencepiece tokenizer of data_fixtures; `--set` swaps it in with a few
alpaca rows. The run must log finite positive losses and export a final/ that loads again.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from data_fixtures import alpaca_rows, trained_tokenizers, write_jsonl
from model_fixtures import CONFIGS as MODEL_CONFIGS
from model_fixtures import family_fixtures, save_hf_model

from packtune.cli import main
from packtune.lora import read_adapter
from packtune.lora.apply import block_linears
from packtune.model.config import ModelArgs
from packtune.model.hf_io import load_pretrained
from packtune.model.moe import Experts

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
FAMILIES = family_fixtures()  # model_type -> its first model_fixtures config, for every registered family


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "tokenizer": trained_tokenizers(tmp_path_factory)["sp"],
        "alpaca": write_jsonl(root / "alpaca.jsonl", alpaca_rows(48, max_words=20)),
    }


def _overrides(model_dir, shared, tmp_path, out):
    return [
        f'model.path="{model_dir}"',
        f'data.path="{shared["alpaca"]}"',
        f'data.tokenizer="{shared["tokenizer"]}"',
        "data.max_tokens=512",
        "data.num_workers=1",
        f'data.cache_dir="{tmp_path / "cache"}"',
        f'train.output_dir="{out}"',
        "train.max_steps=2",
        "train.log_every=1",
        'train.device="cpu"',
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_two_steps(tmp_path, shared, capsys, family):
    fixture = FAMILIES[family]
    assert fixture in MODEL_CONFIGS
    model_dir = save_hf_model(fixture, tmp_path / "model", vocab_size=600)
    assert ModelArgs.from_file(model_dir).model_type == family
    out = tmp_path / "run"
    overrides = _overrides(model_dir, shared, tmp_path, out)
    assert main(["train", str(DEMO), *[a for o in overrides for a in ("--set", o)]]) == 0
    assert "step 2/2" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for r in train_records:
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and math.isfinite(r["grad_norm"])
        assert r["label_tokens"] > 0 and not r["skipped"]
    final = load_pretrained(out / "final")
    assert final.args.model_type == family and final.args.vocab_size == 600
    original = load_pretrained(model_dir)
    assert final.args.layer_types == original.args.layer_types
    assert final.args.sliding_window == original.args.sliding_window


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_two_lora_steps_and_exports_its_adapter(tmp_path, shared, capsys, family):
    """[lora] on every family adapts its own blocks' linears (Phi-3's fused qkv_proj, BLOOM's
    query_key_value, ...): the base stays as loaded, only the adapters change, under PEFT's names."""
    model_dir = save_hf_model(FAMILIES[family], tmp_path / "model", vocab_size=600)
    out = tmp_path / "run"
    overrides = [*_overrides(model_dir, shared, tmp_path, out), "lora.rank=4", "train.lr=1e-2"]
    assert main(["train", str(DEMO), *[a for o in overrides for a in ("--set", o)]]) == 0
    stdout = capsys.readouterr().out
    model = load_pretrained(model_dir)
    linears = block_linears(model)
    modules = [m for layer in model.decoder_layers for m in layer.modules()]
    n = sum(isinstance(m, torch.nn.Linear) for m in modules)
    experts = 2 * sum(isinstance(m, Experts) for m in modules)  # gate_up_proj and down_proj
    where = f"{n} linears" + (f" and {experts} expert weights" if experts else "")
    assert f"lora: rank 4, alpha 16 (scale 4) on {where} ({', '.join(linears)})" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    spec, tensors = read_adapter(out / "final")
    assert sorted(spec.targets) == sorted(linears) and len(tensors) == 2 * (n + experts)
    assert any(t.abs().sum() > 0 for name, t in tensors.items() if name.endswith("lora_B"))


def test_lora_target_missing_from_the_family_is_refused_by_name(tmp_path, shared, capsys):
    """BLOOM's blocks have no q_proj: a clear error naming their linears, no traceback."""
    model_dir = save_hf_model("bloom", tmp_path / "model", vocab_size=600)
    overrides = [*_overrides(model_dir, shared, tmp_path, tmp_path / "run"), "lora.rank=4",
                 'lora.targets=["q_proj", "v_proj"]']
    assert main(["train", str(DEMO), *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert "bloom blocks have no q_proj, v_proj projection" in err and "query_key_value" in err
    assert "Traceback" not in err
