"""`packtune train` with [lora], LoRA and QLoRA (NF4 base), on tiny Llama and Qwen2 models: trains
only the adapters, resumes after SIGKILL with identical losses (dropout on), exports a PEFT adapter
that PEFT loads with packtune's logits and a merged model that transformers loads (QLoRA: over the
dequantised base, the weights the run trained over)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import toy_training
from data_fixtures import alpaca_rows, trained_tokenizers, write_jsonl
from model_fixtures import CONFIGS as HF_CONFIGS
from model_fixtures import TINY

from packtune.checkpoint import SafeFileSystemReader
from packtune.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "lora_demo.toml"


def hf_model_dir(name: str, directory: Path) -> Path:
    cls_name, kwargs = HF_CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**TINY, "vocab_size": 600}, **kwargs)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def with_tokenizer(model_dir: Path, tokenizer: Path) -> Path:
    shutil.copyfile(tokenizer, model_dir / "tokenizer.model")
    return model_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer = trained_tokenizers(tmp_path_factory)["sp"]
    return {
        "llama": with_tokenizer(hf_model_dir("llama3_gqa", root / "llama"), tokenizer),
        "qwen2": with_tokenizer(hf_model_dir("qwen2", root / "qwen2"), tokenizer),
        "tokenizer": tokenizer,
        "alpaca": write_jsonl(root / "alpaca.jsonl", alpaca_rows(48, max_words=20)),
    }


def argv(assets, family, out, *extra):
    overrides = [
        f'model.path="{assets[family]}"', f'data.path="{assets["alpaca"]}"',
        f'data.tokenizer="{assets["tokenizer"]}"', "data.max_tokens=256", "data.num_workers=1",
        f'data.cache_dir="{out.parent / "cache"}"', f'train.output_dir="{out}"', "lora.rank=8",
        "train.epochs=2", "train.save_every=3", "train.log_every=1", 'train.device="cpu"', *extra,
    ]
    return ["train", str(RECIPE), *[a for o in overrides for a in ("--set", o)]]


def history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, toy_training.__file__, *args], env=env, capture_output=True,
                          text=True, timeout=300)


def dequantised_base(model, path: Path) -> Path:
    """`model`'s frozen base as a Hugging Face directory in fp32 (NF4 weights dequantised)."""
    from packtune.kernels.lora import dense_weight
    from packtune.model.hf_io import save_pretrained

    state = {name: dense_weight(t, torch.float32) for name, t in model.state_dict().items()
             if not name.endswith((".lora_A", ".lora_B"))}
    return save_pretrained(model, path, state_dict=state, dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["auto", "nf4"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_run_resumes_identically_and_exports_for_peft(tmp_path, assets, family, base_dtype, capsys):
    if base_dtype == "nf4":
        pytest.importorskip("torchao")
    args = lambda out: argv(assets, family, out, f'lora.base_dtype="{base_dtype}"')
    reference = run("cli", *args(tmp_path / "a"))
    assert reference.returncode == 0, reference.stderr
    assert "lora: rank 8" in reference.stdout and "trainable" in reference.stdout
    stored = "nf4" if base_dtype == "nf4" else "float32"
    assert re.search(rf"frozen base [0-9.]+ MiB \({stored}\)", reference.stdout)
    killed = run("kill_at=5", "cli", *args(tmp_path / "b"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoint = tmp_path / "b" / "checkpoints" / "step_00000003"
    saved = SafeFileSystemReader(checkpoint).read_metadata().state_dict_metadata
    assert saved and all("lora_" in key for key in saved)  # adapters and their moments, not the base
    resumed = run("cli", *args(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 3" in resumed.stdout
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "label_tokens")
    expected = [[r.get(k) for k in keys] for r in history(tmp_path / "a")]
    assert len(expected) > 5
    assert [[r.get(k) for k in keys] for r in history(tmp_path / "b")] == expected

    out = tmp_path / "b"
    ids = torch.randint(0, 600, (2, 13), generator=torch.Generator().manual_seed(1))
    from packtune.lora import load_adapter_into
    from packtune.lora.apply import convert_base
    from packtune.model.hf_io import load_pretrained

    ours = load_pretrained(assets[family], dtype=torch.float32)
    load_adapter_into(ours, out / "final", "nf4" if base_dtype == "nf4" else None)
    assert any(p.abs().max() > 0 for n, p in ours.named_parameters() if "lora_B" in n)  # it trained
    # QLoRA: PEFT's base holds the weights packtune's model computes with (NF4 dequantised, the other
    # frozen weights as loaded: fp32 on a CPU); both compute in fp32 (the bf16 values upcast exactly)
    base_dir = assets[family] if base_dtype != "nf4" else dequantised_base(ours, tmp_path / "dequantised")
    convert_base(ours, torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, out / "final").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "final-merged", dtype=torch.float32)
    with torch.no_grad():
        expected_logits = ours.eval()(ids)
        scale = expected_logits.abs().max().item()
        for logits in (peft_model(input_ids=ids).logits, merged.eval()(input_ids=ids).logits):
            torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5 * scale)

    # `packtune merge` afterwards writes what the run's merged export wrote
    assert main(["merge", str(base_dir), str(out / "final"), str(tmp_path / "merged")]) == 0
    merged_again = load_pretrained(tmp_path / "merged").state_dict()
    for name, value in load_pretrained(out / "final-merged").state_dict().items():
        torch.testing.assert_close(merged_again[name], value, rtol=0, atol=1e-6, msg=name)
    # `generate --adapter` continues like the merged model
    gen = ["generate", "--prompt", "the quick", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main([*gen, "--model", str(base_dir), "--adapter", str(out / "final")]) == 0
    assert main([*gen, "--model", str(out / "final-merged")]) == 0
    with_adapter, merged_text = capsys.readouterr().out.splitlines()[-2:]
    assert with_adapter == merged_text


@pytest.mark.parametrize("extra", [(), ('lora.base_dtype="nf4"', 'model.dtype="bfloat16"')],
                         ids=["lora", "qlora-one-rank-fsdp"])
def test_adapter_export_writes_no_merged_model(tmp_path, assets, extra):
    """Also QLoRA with bf16 compute: one process on a one-rank FSDP mesh (as on one GPU), where
    FSDP leaves the NF4 weights whole."""
    if extra:
        pytest.importorskip("torchao")
    out = tmp_path / "adapter"
    assert main(argv(assets, "llama", out, "train.max_steps=3", 'train.export="adapter"', *extra)) == 0
    records = [r for r in history(out) if "loss" in r]
    assert len(records) == 3 and all(r["loss"] > 0 and not r["skipped"] for r in records)
    assert (out / "final" / "adapter_model.safetensors").is_file() and not (out / "final-merged").exists()
