"""The packtune side of `packtune bench e2e`: the stages of `packtune train` (packtune.run).

The config is what a user would write for this data (alpaca format and template, packed rows of
`max_tokens`, the bench's rows per step, lr and warmup); the timed part is `Trainer.fit()`, as
`trainer.train()` is on the TRL side: data preparation and model loading are outside both timers.

With `objective = "dpo"` (bench/e2e_dpo.py) the data are preference pairs in TRL's standard layout
(template "raw": the prompt text, then the response and EOS, as TRL renders them), trained with
prefix-shared packed pairs, and the timed part starts at the reference pass (`attach_reference`:
the policy as it starts scores every pair once), which TRL runs inside `trainer.train()`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from packtune.bench.e2e_common import peak_rss_since_reset, reset_peak_rss


def config(spec: dict[str, Any]):
    from packtune.config import Config

    cfg = Config()
    cfg.model.path = spec["init_dir"]
    cfg.data.path = spec["data"]
    if spec.get("objective", "sft") == "sft":
        cfg.data.format, cfg.data.template = "alpaca", "alpaca"
    else:
        cfg.data.format, cfg.data.template = "preference", "raw"
        cfg.train.objective = spec["objective"]
        cfg.preference.beta = spec["beta"]
    cfg.data.tokenizer = spec["tokenizer"]
    cfg.data.max_tokens = spec["max_tokens"]
    cfg.data.cache_dir = str(Path(spec["out_dir"]) / "cache")
    t = cfg.train
    t.output_dir = spec["out_dir"]
    t.micro_batches = spec["rows_per_micro_batch"]
    t.epochs = 1
    t.lr = spec["lr"]
    t.warmup = float(spec["warmup"])
    t.weight_decay = 0.0
    t.max_grad_norm = 1.0
    t.seed = spec["seed"]
    t.resume = "never"
    t.device = "cpu"
    t.log_every = 1
    if spec.get("lora_rank"):
        cfg.lora.rank, cfg.lora.alpha = spec["lora_rank"], 2.0 * spec["lora_rank"]
        cfg.lora.base_dtype = spec.get("lora_base_dtype", "auto")
        t.export = "merged"  # the judge scores a Hugging Face model directory
    return cfg


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the first `spec["rows"]` rows for one epoch; returns the measurement and the exported
    model directory."""
    import json

    import torch

    from packtune.bench.e2e_common import read_jsonl
    from packtune.data.rows import prepare_run_data
    from packtune.demo.mix import write_jsonl
    from packtune.export import export_model
    from packtune.parallel import init_distributed, shutdown
    from packtune.preference.reference import attach_reference
    from packtune.run import build_trainer, mixed_precision

    out = Path(spec["out_dir"])
    records = read_jsonl(spec["data"], spec["rows"])
    subset = write_jsonl(records, out / "data.jsonl", fields=tuple(records[0]))
    cfg = config({**spec, "data": str(subset)})
    cfg.check()
    torch.manual_seed(cfg.train.seed)
    mixed = mixed_precision(cfg)
    dist_ctx = init_distributed(cfg.train.device, mixed_precision=mixed)
    try:
        data = prepare_run_data(cfg, dist_ctx)
        trainer = build_trainer(cfg, data, dist_ctx, mixed)
        reset_peak_rss()
        start, cpu_start = time.perf_counter(), time.process_time()
        ref_logps = attach_reference(cfg, data.dataset, trainer, dist_ctx, mixed)  # None for SFT
        trainer.fit()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = peak_rss_since_reset()
        final = export_model(trainer, cfg)
    finally:
        shutdown(dist_ctx)
    records = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8") if line.strip()]
    steps = [r for r in records if "loss" in r and "tokens" in r]
    result = {"train_s": seconds, "cpu_s": cpu_seconds, "steps": len(steps), "samples": spec["rows"],
              "real_tokens": sum(r["tokens"] for r in steps),
              "label_tokens": sum(r["label_tokens"] for r in steps),
              "peak_bytes": peak, "train_losses": [r["loss"] for r in steps], "model_dir": str(final)}
    if ref_logps is not None:
        result["ref_logps"] = ref_logps.tolist()
    return result
