"""`packtune bench memory`: peak resident memory of one training step against the row length.

A 135M-class Llama in SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 kv heads, intermediate
1536, vocabulary 49152, tied embeddings; random weights, fp32, nothing downloaded) trains one
optimizer step (forward, backward, AdamW) on one packed row of each length, full fine-tuning and
LoRA (rank 16 on every linear), under each setting:

    none           activation checkpointing off
    checkpointing  [train] activation_checkpointing
    tiled          + tiled_mlp = "auto"
    offload        + offload_activations (on a CPU the hooks copy within host memory: no saving)

packtune's loss is the chunked fused linear cross-entropy in every setting (it never forms the
logits). The baseline `trl` is transformers' LlamaForCausalLM of the same shape on the same row,
collated by TRL's padding-free `DataCollatorForLanguageModeling` (per-sample position_ids, SDPA),
without and with gradient checkpointing, its loss over materialised logits.

`--layers` and `--vocab` shrink the shape so that the whole table runs in minutes on a small CPU
(the figures in docs/long-context.md); the slope's floor follows the layers.

Each measurement is a fresh process (bench/harness.py's reasoning): it builds the model and the row,
runs one step, and reports the process's peak resident set (VmHWM) during the step, the model,
gradients and optimizer state included, the step's time (tokens per second) and its loss (packtune's
settings compute the same step: their losses agree to fp32 rounding). Every worker, transformers'
included, first fixes glibc's mmap threshold as packtune's Trainer does on the CPU
(packtune.host_memory): otherwise the heap's freed holes, not the tensors, set the peak. Ratios are
against packtune's `none` setting of the same mode and row length, measured in the same run. The
parent kills a process whose resident set passes `--cap-gib` (the machine is shared: nothing may push
it out of memory) and reports the length as over the cap, not an estimate. Rows are packed from samples of
`--sample-tokens` tokens (the attention's time grows with the sample length, its memory with the
row's), half of each trained. The fit: least squares of peak bytes against row tokens per
(implementation, mode, setting), the slope as bytes per token beside the floor that the
checkpointed block inputs alone need (layers x hidden x 4 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from packtune.bench.e2e_common import proc_status_bytes

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
             rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=262144)
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "checkpointing": {"activation_checkpointing": True},
    "tiled": {"activation_checkpointing": True, "tiled_mlp": "tile"},
    "offload": {"activation_checkpointing": True, "tiled_mlp": "tile", "offload_activations": True},
}
"""`"tile"` stands for `--tile`: "auto" (4096-token tiles at this shape) or a tile size in tokens."""
TRL_SETTINGS = ("none", "checkpointing")
LORA_RANK = 16


def shape(layers: int, vocab: int) -> dict[str, Any]:
    """SmolLM2-135M's shape with `layers` blocks and a `vocab`-token vocabulary."""
    return {**SHAPE, "num_hidden_layers": layers, "vocab_size": vocab}


def floor_bytes(layers: int) -> int:
    """Bytes per token of the checkpointed block inputs alone (fp32): layers x hidden x 4."""
    return layers * SHAPE["hidden_size"] * 4


def packed_samples(tokens: int, sample_tokens: int, vocab: int,
                   seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, trainable) of samples filling `tokens`: `sample_tokens` each (the last one shorter),
    the second half of each trained."""
    rng = np.random.default_rng(seed)
    rest = tokens % sample_tokens
    lengths = [sample_tokens] * (tokens // sample_tokens) + ([rest] if rest else [])
    samples = []
    for n in lengths:
        trainable = np.arange(n) >= n // 2
        samples.append((rng.integers(0, vocab, n), trainable))
    return samples


def packed_batch(samples: list[tuple[np.ndarray, np.ndarray]]):
    """`packed_samples` as one packed row (a PackedBatch: ids, labels where trained, the sample lengths)."""
    from packtune.data.packing import build_packed_batch

    ids = np.concatenate([s[0] for s in samples])
    trainable = np.concatenate([s[1] for s in samples])
    return build_packed_batch(ids, ids, trainable, np.array([len(s[0]) for s in samples]))


def packtune_step(mode: str, setting: str, samples, model_shape: dict[str, Any], tile: str | int,
                  output_dir: str):
    """One optimizer step of packtune's Trainer on the packed row; the step returns its loss."""
    import torch

    from packtune.config import TrainConfig
    from packtune.lora.apply import LoRASpec, apply_lora
    from packtune.model.config import ModelArgs
    from packtune.model.llama import LlamaForCausalLM
    from packtune.parallel import init_distributed
    from packtune.train import Trainer

    model = LlamaForCausalLM(ModelArgs(**model_shape))
    model.init_weights(torch.Generator().manual_seed(0))
    if mode == "lora":
        apply_lora(model, LoRASpec(LORA_RANK, 2.0 * LORA_RANK), torch.float32)
    batch = packed_batch(samples)
    train = {k: tile if v == "tile" else v for k, v in SETTINGS[setting].items()}
    cfg = TrainConfig(output_dir=output_dir, max_steps=1, progress="none", **train)
    trainer = Trainer(cfg, model, [[batch]], init_distributed("cpu"), log_stream=open(os.devnull, "w"))

    def step() -> float:
        trainer.train_step([batch])
        return trainer.metrics.flush()[-1]["loss"]

    return step


def trl_step(mode: str, setting: str, samples, model_shape: dict[str, Any]):
    """One optimizer step of transformers' Llama on TRL's padding-free batch; the step returns its loss."""
    import torch
    import transformers
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    config = transformers.LlamaConfig(
        **model_shape, use_cache=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).float().train()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    if setting == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            model.enable_input_require_grads()
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": ids.tolist(), "labels": np.where(t, ids, -100).tolist()}
                     for ids, t in samples])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process: build, then one step's peak resident set."""
    import gc

    import torch

    from packtune.host_memory import release_freed_tensors

    release_freed_tensors()  # what packtune's Trainer does on the CPU, for transformers' step as well
    torch.manual_seed(0)
    model_shape = shape(spec["layers"], spec["vocab"])
    samples = packed_samples(spec["tokens"], spec["sample_tokens"], spec["vocab"])
    with tempfile.TemporaryDirectory() as tmp:
        if spec["impl"] == "packtune":
            step = packtune_step(spec["mode"], spec["setting"], samples, model_shape, spec["tile"], tmp)
        else:
            step = trl_step(spec["mode"], spec["setting"], samples, model_shape)
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = proc_status_bytes("VmRSS")
        start = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - start
        return {"peak_bytes": proc_status_bytes("VmHWM"), "before_bytes": before, "step_s": seconds,
                "tokens_per_s": spec["tokens"] / seconds, "loss": loss}


def measure(spec: dict[str, Any], cap_bytes: int, timeout: float) -> dict[str, Any]:
    """`worker(spec)` in a fresh process, killed when its resident set passes `cap_bytes`."""
    proc = subprocess.Popen([sys.executable, "-m", "packtune.bench.memory", "--worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, over = time.monotonic(), False
    while proc.poll() is None:
        try:
            rss = proc_status_bytes("VmRSS", proc.pid)
        except FileNotFoundError:
            rss = 0
        if rss > cap_bytes or time.monotonic() - start > timeout:
            over = rss > cap_bytes
            proc.kill()
            proc.wait()
            return {"error": f"over the {cap_bytes / 2**30:.0f} GiB cap" if over else f"over {timeout:.0f} s"}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.strip().splitlines()[-1])


def fit(points: list[tuple[int, int]]) -> tuple[float, float] | None:
    """(bytes per token, intercept bytes) of the least-squares line through (tokens, peak bytes)."""
    if len(points) < 2:
        return None
    tokens, peaks = np.array(points, dtype=np.float64).T
    slope, intercept = np.polyfit(tokens, peaks, 1)
    return float(slope), float(intercept)


def machine_load() -> str:
    """The load averages and the memory the rest of the machine holds, for the record."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    info = {line.split(":")[0]: int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()}
    return (f"load average {load} on {os.cpu_count()} CPUs; memory {info['MemTotal'] / 2**30:.1f} GiB, "
            f"{info['MemAvailable'] / 2**30:.1f} GiB available")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="packtune bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536", help="row lengths in tokens")
    parser.add_argument("--modes", default="full,lora", help="full and/or lora (rank 16, every linear)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--impls", default="packtune,trl", help="packtune and/or trl (transformers + TRL)")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab_size"])
    parser.add_argument("--sample-tokens", type=int, default=4096)
    parser.add_argument("--tile", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help='the tiled settings\' tiled_mlp: "auto" or tokens per tile')
    parser.add_argument("--cap-gib", type=float, default=14.0,
                        help="kill a measurement past this resident set")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per measurement")
    parser.add_argument("--out", default="bench_results", help="folder for memory.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    lengths = [int(n) for n in args.lengths.split(",")]
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown or not set(args.impls.split(",")) <= {"packtune", "trl"} or \
            not set(args.modes.split(",")) <= {"full", "lora"}:
        raise SystemExit(f"packtune bench memory: unknown setting, impl or mode in "
                         f"{args.settings!r} / {args.impls!r} / {args.modes!r}")
    print(f"packtune bench memory: SmolLM2-135M shape with {args.layers} layers and a {args.vocab}-token "
          f"vocabulary, fp32, rows of {args.sample_tokens}-token samples, tiled_mlp = {args.tile!r}, "
          f"cap {args.cap_gib:g} GiB; {machine_load()}", flush=True)
    print(f"{'impl':<9}{'mode':<6}{'setting':<15}{'tokens':>8}{'peak GiB':>10}{'step s':>9}{'tok/s':>9}"
          f"{'loss':>10}  load", flush=True)
    rows, out = [], Path(args.out)
    for impl in args.impls.split(","):
        for mode in args.modes.split(","):
            for setting in args.settings.split(","):
                if impl == "trl" and setting not in TRL_SETTINGS:
                    continue
                failed = False
                for tokens in lengths:
                    spec = {"impl": impl, "mode": mode, "setting": setting, "tokens": tokens,
                            "sample_tokens": args.sample_tokens, "layers": args.layers, "vocab": args.vocab,
                            "tile": args.tile}
                    result = ({"error": "a shorter row was over the cap"} if failed
                              else measure(spec, int(args.cap_gib * 2**30), args.timeout))
                    failed = "error" in result
                    load = Path("/proc/loadavg").read_text().split()[0]
                    rows.append({**spec, **result, "load": load})
                    figures = f"  {result['error']}" if failed else (
                        f"{result['peak_bytes'] / 2**30:>10.2f}{result['step_s']:>9.1f}"
                        f"{result['tokens_per_s']:>9.0f}{result['loss']:>10.5f}")
                    print(f"{impl:<9}{mode:<6}{setting:<15}{tokens:>8}{figures}  {load}", flush=True)
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "memory.json").write_text(json.dumps(rows, indent=1))
    print_ratios(rows)
    print_fits(rows, floor_bytes(args.layers))


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured row's peak memory and tokens per second against packtune's `none` setting of the
    same mode and row length, when that was measured in this run."""
    base = {(r["mode"], r["tokens"]): r for r in rows
            if r["impl"] == "packtune" and r["setting"] == "none" and "peak_bytes" in r}
    out = []
    for r in rows:
        b = base.get((r["mode"], r["tokens"]))
        if "peak_bytes" in r and b is not None:
            out.append({**{k: r[k] for k in ("impl", "mode", "setting", "tokens")},
                        "peak_ratio": r["peak_bytes"] / b["peak_bytes"],
                        "speed_ratio": r["tokens_per_s"] / b["tokens_per_s"]})
    return out


def print_ratios(rows: list[dict[str, Any]]) -> None:
    found = ratios(rows)
    if not found:
        return
    print("against packtune's `none` of the same mode and row length, this run:")
    print(f"  {'impl':<9}{'mode':<6}{'setting':<15}{'tokens':>8}{'peak x':>9}{'tok/s x':>9}")
    for r in found:
        print(f"  {r['impl']:<9}{r['mode']:<6}{r['setting']:<15}{r['tokens']:>8}{r['peak_ratio']:>9.2f}"
              f"{r['speed_ratio']:>9.2f}")


def print_fits(rows: list[dict[str, Any]], floor: int) -> None:
    print(f"fitted slope (bytes per token) vs the checkpointed inputs' floor of {floor} B/token:")
    groups: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    for r in rows:
        if "peak_bytes" in r:
            groups.setdefault((r["impl"], r["mode"], r["setting"]), []).append((r["tokens"], r["peak_bytes"]))
    for (impl, mode, setting), points in groups.items():
        line = fit(points)
        if line is not None:
            print(f"  {impl:<9}{mode:<6}{setting:<15}{line[0] / 1024:>8.1f} KiB/token "
                  f"({line[0] / floor:.2f}x the floor), intercept {line[1] / 2**30:.2f} GiB, "
                  f"from {len(points)} lengths")


if __name__ == "__main__":
    main(sys.argv[1:])
