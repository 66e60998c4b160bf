"""`packtune train` throughput and MFU on a random-init Llama-3.2-1B-shaped model (gpu-check's train part).

    python -m packtune.bench.gpu_train OUT_DIR [--smoke]

Builds everything locally, nothing downloaded: the demo's generated instruction data and a
sentencepiece tokenizer trained on it, then a randomly initialised Llama with the 1B shape
(hidden 2048, 16 layers, 32 query / 8 kv heads, MLP 8192, vocabulary 128256: the rows past the
small tokenizer's pieces are never used as labels but are computed, as in the real model),
and runs `packtune train` (the CLI, in a subprocess) on it: bf16 over fp32 master weights,
packed rows of 8192 tokens, 2 micro-batches per step, 20 steps. Writes `OUT_DIR/train.json`
(losses, median tokens/s and MFU over the steps after the first 3, peak memory) and keeps the
run's metrics.jsonl. `--smoke`: a one-layer toy on the CPU for 3 steps (a finite loss required,
not yet a falling one), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from packtune.config import dump_config
from packtune.data.tokenizer import load_tokenizer
from packtune.demo.mix import make_split, write_jsonl
from packtune.demo.prompts import rendered_texts
from packtune.demo.recipe import FULL, write_template
from packtune.demo.tokenizer_training import train_tokenizer
from packtune.model.config import ModelArgs
from packtune.model.hf_io import save_pretrained
from packtune.model.llama import LlamaForCausalLM

GPU = replace(
    FULL,
    records_per_task=1000,
    vocab_size=4000,
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    intermediate_size=8192,
    lr=3e-4,
    max_tokens=8192,
    micro_batches=2,
    log_every=1,
)
SMOKE = replace(
    GPU,
    records_per_task=30,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    lr=1e-3,
    max_tokens=256,
    vocab_size=400,
)
STEPS = {"gpu": 20, "smoke": 3}


def prepare(out: Path, smoke: bool) -> Path:
    """Data, tokenizer, model and config under `out`; returns the config file."""
    recipe = SMOKE if smoke else GPU
    records = make_split("train", recipe.records_per_task, 0)
    data = write_jsonl(records, out / "data" / "train.jsonl")
    template = write_template(out / "template.toml")
    tokenizer = train_tokenizer(
        rendered_texts(records, str(template)), out / "tokenizer.model", recipe.vocab_size, model_type="bpe"
    )
    pieces = load_tokenizer(tokenizer).vocab_size
    hf = recipe.hf_config(pieces if smoke else max(pieces, 128256))
    hf["num_key_value_heads"] = max(1, recipe.num_attention_heads // 4)
    device = "cpu" if smoke else "cuda"
    with torch.device(device):
        model = LlamaForCausalLM(ModelArgs.from_hf_config(hf))
    model.init_weights()
    model_dir = save_pretrained(model, out / "init", tokenizer_files=[tokenizer])
    del model
    cfg = recipe.train_config(out, model_dir, data, tokenizer, template, seed=0)
    cfg.train.device = device
    cfg.train.max_steps = STEPS["smoke" if smoke else "gpu"]
    cfg.train.warmup = 2
    cfg.train.save_every = 0
    cfg.train.export = False  # the throughput is the point; writing 2.5 GB back is not
    cfg.model.dtype = "float32" if smoke else "bfloat16"
    path = out / "train.toml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path


def summarise(metrics: Path, skip: int = 3) -> dict:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    losses = [r["loss"] for r in records]
    late = records[skip:] or records
    mfus = [r["mfu"] for r in late if r.get("mfu") is not None]
    return {
        "steps": len(records),
        "losses": losses,
        "finite": all(x is not None and math.isfinite(x) for x in losses),
        "falling": len(losses) >= 2 and statistics.mean(losses[-3:]) < losses[0],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in late) if late else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_memory_gib": max((r.get("peak_memory_gib") or 0.0) for r in records) if records else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m packtune.bench.gpu_train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    config = prepare(out, args.smoke)
    prepared_s = time.perf_counter() - start
    proc = subprocess.run([sys.executable, "-m", "packtune", "train", str(config)], check=False)
    result = {
        "returncode": proc.returncode,
        "prepare_s": round(prepared_s, 1),
        "train_s": round(time.perf_counter() - start - prepared_s, 1),
    }
    metrics = out / "run" / "metrics.jsonl"
    if metrics.exists():
        result.update(summarise(metrics))
    # A 3-step smoke run is still in its warmup: only the GPU run must show a falling loss.
    result["ok"] = bool(
        proc.returncode == 0 and result.get("finite") and (args.smoke or result.get("falling"))
    )
    (out / "train.json").write_text(json.dumps(result, indent=1))
    mfu = result.get("mfu")
    print(
        f"train: {'PASS' if result['ok'] else 'FAIL'} rc={proc.returncode}, {result.get('steps', 0)} steps, "
        f"loss {result.get('losses', ['?'])[0]} -> {result.get('losses', ['?'])[-1]}, "
        f"tokens/s {result.get('tokens_per_s')}, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
