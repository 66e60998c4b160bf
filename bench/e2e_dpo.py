"""`packtune bench e2e --objective dpo`: DPO on the same preference pairs, packtune (`packtune train` with
`objective = "dpo"`: the reference pass cached before step 1, prompts packed once per pair) against TRL's
`DPOTrainer` (its default: a copy of the initial policy held as the reference and run beside every step).

The pairs are the bench's generated Alpaca-shaped records (bench/alpaca_like.py) in TRL's standard
layout, as docs/preference.md's worked example builds them: the Alpaca prompt, the record's answer
chosen, another record's answer rejected. Both sides start from the same random Llama, with the
initial policy as the reference, the same beta, lr, warmup, cosine schedule and pairs per step (TRL:
`--padding-batch` pairs per padded micro-batch; packtune: rows sized to hold as many, as many rows per
step as TRL has micro-batches), for one epoch over the same first `--pairs` pairs. Each side is a fresh
process; the timer and the peak-memory mark start before the reference log-probs are computed.
TRL's reference model is loaded in `DPOTrainer`'s constructor, before the mark, and held through
training, so its weights' bytes are added to TRL's peak.

TRL 1.16's `padding_free=True` for DPO is turned back into padding by the trainer (a warning,
`self.padding_free = False`): the `trl-padding-free` side builds the trainer, reports that fallback
and trains nothing (its run would be `trl-padding`'s). `trl-padding-packtune` is `trl-padding` with
`apply_packtune` on the policy and on the reference model after the trainer is built
(docs/integrations.md): TRL's own loop, data and reference model, their forwards through packtune's
kernels and fused LM head.

One judge scores both sides' final models: transformers' model, tokenized as TRL tokenizes (the
prompt, then prompt + response + EOS, the response starting where the two part); the held-out
preference accuracy is the share of held-out pairs whose chosen response gets the higher summed
log-prob. The judge also scores the training pairs with the initial model: packtune's cached reference
log-probs must equal them (the same tokens and model on both sides), and the step-1 losses of both
sides (log 2, as the policy is its own reference) are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packtune.bench.e2e_common import alpaca_prompt, peak_rss_since_reset, read_jsonl, reset_peak_rss

IMPLS = ("packtune", "trl-padding", "trl-padding-free", "trl-padding-packtune")
BASELINES = ("trl-padding",)


def make_pairs(records: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """TRL standard-layout pairs: each record's answer chosen, another record's answer rejected."""
    rng = random.Random(seed)
    pairs = []
    for r in records:
        rejected = rng.choice(records)["output"]
        if rejected != r["output"]:
            pairs.append({"prompt": alpaca_prompt(r), "chosen": " " + r["output"],
                          "rejected": " " + rejected})
    return pairs


def pair_lengths(tokenizer_model: str | Path, pairs: list[dict[str, str]]) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of each pair: BOS + prompt, each response + EOS."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    out = []
    for p in pairs:
        prompt = len(sp.encode(p["prompt"]))
        sides = [len(sp.encode(p["prompt"] + p[s])) - prompt + 1 for s in ("chosen", "rejected")]
        out.append((prompt + 1, *sides))
    return out


def plan(args: argparse.Namespace, lengths: list[tuple[int, int, int]]) -> dict[str, Any]:
    """The pairs, steps and micro-batches of both sides, and packtune's row length: `--padding-batch`
    prompt-shared pairs on average, at least the longest pair unshared (none is dropped)."""
    n = min(args.pairs, len(lengths))
    lengths = lengths[:n]
    micro_batches = max(args.pairs_per_step // args.padding_batch, 1)
    pairs_per_step = micro_batches * args.padding_batch
    shared = sum(p + c + r for p, c, r in lengths) / n
    longest = max(2 * p + c + r for p, c, r in lengths)
    steps = math.ceil(n / pairs_per_step)
    return {"pairs": n, "pairs_per_step": pairs_per_step, "micro_batches": micro_batches, "steps": steps,
            "max_tokens": max(round(args.padding_batch * shared), longest), "mean_shared_tokens": shared,
            "warmup": max(round(0.03 * steps), 1)}


def write_pairs(work: Path, seed: int) -> tuple[Path, Path]:
    """pairs.jsonl from the bench's training records, heldout_pairs.jsonl from its held-out ones."""
    paths = []
    for source, name in (("data.jsonl", "pairs.jsonl"), ("heldout.jsonl", "heldout_pairs.jsonl")):
        path = work / name
        with open(path, "w", encoding="utf-8") as f:
            for pair in make_pairs(read_jsonl(work / source), seed):
                f.write(json.dumps(pair) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer over `spec["rows"]` pairs for one epoch; returns the measurement."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(spec["seed"])
    padding_free = spec["impl"] == "trl-padding-free"
    tokenizer = AutoTokenizer.from_pretrained(spec["init_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["init_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    config = DPOConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["samples_per_micro_batch"],
        gradient_accumulation_steps=spec["micro_batches"], learning_rate=spec["lr"], beta=spec["beta"],
        lr_scheduler_type="cosine", warmup_steps=spec["warmup"], weight_decay=0.0, max_grad_norm=1.0,
        num_train_epochs=1, seed=spec["seed"], data_seed=spec["seed"], max_length=None,
        padding_free=padding_free, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, bf16=False, gradient_checkpointing=False, dataloader_num_workers=0,
        disable_tqdm=True, disable_dropout=True)
    dataset = Dataset.from_list(read_jsonl(spec["data"], spec["rows"]))
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    if spec["impl"] == "trl-padding-packtune":
        from packtune.integrations import apply_packtune

        apply_packtune(trainer.model)
        apply_packtune(trainer.ref_model)
    if padding_free and not trainer.padding_free:
        import trl

        return {"error": f"TRL {trl.__version__} DPOTrainer turns padding_free=True back into padding "
                         "(trainer.padding_free is False after construction; its run is trl-padding's)"}
    columns = trainer.train_dataset
    label_tokens = sum(len(c) + len(r) for c, r in zip(columns["chosen_ids"], columns["rejected_ids"],
                                                       strict=True))
    real_tokens = label_tokens + 2 * sum(len(p) for p in columns["prompt_ids"])
    held = trainer.ref_model.parameters() if trainer.ref_model is not None else ()
    ref_bytes = sum(p.numel() * p.element_size() for p in held)
    reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_rss_since_reset() + ref_bytes
    trainer.save_model(spec["out_dir"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    Path(spec["out_dir"], "log_history.json").write_text(json.dumps(trainer.state.log_history))
    return {"train_s": seconds, "cpu_s": cpu_seconds, "steps": trainer.state.global_step,
            "samples": len(columns),
            "real_tokens": real_tokens, "label_tokens": label_tokens, "peak_bytes": peak,
            "reference_bytes": ref_bytes, "train_losses": losses, "model_dir": spec["out_dir"]}


def judge_logps(model_dir: str | Path, pairs: list[dict[str, str]]) -> list[tuple[float, float]]:
    """(chosen, rejected) summed response log-probs under transformers' model at `model_dir`, one
    sequence at a time, tokenized as TRL's DPOTrainer tokenizes standard pairs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for pair in pairs:
            prompt = tokenizer(pair["prompt"])["input_ids"]
            sides = []
            for side in ("chosen", "rejected"):
                ids = tokenizer(pair["prompt"] + pair[side] + tokenizer.eos_token)["input_ids"]
                start = next((i for i, (a, b) in enumerate(zip(prompt, ids, strict=False)) if a != b),
                             min(len(prompt), len(ids)))
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
                logp = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
                sides.append(float(logp[start - 1:].sum()))
            out.append((sides[0], sides[1]))
    return out


def accuracy(logps: list[tuple[float, float]]) -> float:
    """Share of pairs whose chosen response has the higher summed log-prob (a tie counts against)."""
    return sum(c > r for c, r in logps) / max(len(logps), 1)


def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    """One side's run in this process (e2e.py's worker), judged on the held-out pairs; packtune's also
    has its reference log-probs checked against the judge's on the initial model."""
    if spec["impl"] == "packtune":
        from packtune.bench import e2e_packtune

        result = e2e_packtune.run(spec)
    else:
        result = run_trl(spec)
    if "error" in result:
        return result
    result["heldout_accuracy"] = accuracy(judge_logps(result["model_dir"], read_jsonl(spec["heldout"])))
    cached = result.pop("ref_logps", None)
    if cached is not None:
        judged = judge_logps(spec["init_dir"], read_jsonl(spec["data"], spec["rows"]))
        result["reference_max_rel_error"] = max(abs(a - b) / abs(b)
                                                for got, want in zip(cached, judged, strict=True)
                                                for a, b in zip(got, want, strict=True))
    return result


def main(args: argparse.Namespace, work: Path, run_in_subprocess: Callable[[dict[str, Any]], dict[str, Any]]
         ) -> list[dict[str, Any]]:
    """The DPO bench over `work` (prepared by e2e.prepare); `run_in_subprocess` runs one side's spec."""
    import datetime as dt
    import shutil

    data, heldout = write_pairs(work, args.seed)
    shape = plan(args, pair_lengths(work / "tokenizer.model", read_jsonl(data)))
    print(f"packtune bench e2e --objective dpo: {shape['pairs']} pairs, {shape['pairs_per_step']} per step "
          f"({shape['micro_batches']} micro-batches), {shape['steps']} steps, beta {args.beta}, "
          f"lr {args.lr}; "
          f"packtune rows of {shape['max_tokens']} tokens; {len(read_jsonl(heldout))} held-out pairs",
          flush=True)
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results = []
    for impl in args.impl or IMPLS:
        spec = {"impl": impl, "objective": "dpo", "model": "small", "init_dir": str(work / "init_small"),
                "out_dir": str(work / f"run_dpo_{impl}"), "data": str(data), "heldout": str(heldout),
                "tokenizer": str(work / "tokenizer.model"), "rows": shape["pairs"], "lr": args.lr,
                "beta": args.beta, "threads": args.threads, "warmup": shape["warmup"], "seed": args.seed,
                "max_tokens": shape["max_tokens"], "samples_per_micro_batch": args.padding_batch,
                "rows_per_micro_batch": shape["micro_batches"], "micro_batches": shape["micro_batches"]}
        shutil.rmtree(spec["out_dir"], ignore_errors=True)
        print(f"  running small / dpo / {impl} ...", flush=True)
        res = run_in_subprocess(spec)
        if "error" not in res:
            res["pairs_per_s"] = res["samples"] / res["train_s"]
            res["pairs_per_cpu_s"] = res["samples"] / res["cpu_s"]
        results.append({"subject": "e2e", "objective": "dpo", "model": "small", "implementation": impl,
                        "timestamp": stamp, "plan": shape, **res})
    print_table(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_dpo.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'e2e_dpo.json'}")
    return results


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'implementation':<22}{'steps':>6}{'pairs':>6}{'pairs/s':>9}{'peak MiB':>10}"
          f"{'held-out acc':>13}{'step-1 loss':>12}{'last loss':>10}")
    done = {r["implementation"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['implementation']:<22}  not run: {r['error']}")
            continue
        print(f"{r['implementation']:<22}{r['steps']:>6}{r['samples']:>6}{r['pairs_per_s']:>9.2f}"
              f"{r['peak_bytes'] / 2**20:>10.0f}{100 * r['heldout_accuracy']:>12.1f}%"
              f"{r['train_losses'][0]:>12.6f}{r['train_losses'][-1]:>10.4f}")
    for r in rows:
        if "reference_max_rel_error" in r:
            print(f"  {r['implementation']}'s reference log-probs vs transformers' on TRL's tokens "
                  f"(the initial model): max relative error {r['reference_max_rel_error']:.1e}")
    for side_name in ("packtune", "trl-padding-packtune"):
        for name in BASELINES:
            if side_name in done and name in done:
                _compare(side_name, done[side_name], name, done[name])


def _compare(side_name: str, side: dict[str, Any], name: str, b: dict[str, Any]) -> None:
    """Print `side` against baseline `b` and record the ratios in `side`."""
    ratios = {"speedup": side["pairs_per_s"] / b["pairs_per_s"],
              "cpu_speedup": side["pairs_per_cpu_s"] / b["pairs_per_cpu_s"],
              "memory": side["peak_bytes"] / max(b["peak_bytes"], 1),
              "step1_loss_rel_diff": abs(side["train_losses"][0] - b["train_losses"][0])
              / abs(b["train_losses"][0])}
    side.update({f"{key}_vs_{name}": value for key, value in ratios.items()})
    print(f"  {side_name} vs {name}: {ratios['speedup']:.2f}x pairs/s ({ratios['cpu_speedup']:.2f}x pairs "
          f"per CPU-second of the process), {ratios['memory']:.2f}x peak memory "
          f"(TRL's with its reference model's {b['reference_bytes'] / 2**20:.0f} MiB), held-out accuracy "
          f"{100 * side['heldout_accuracy']:.1f}% vs {100 * b['heldout_accuracy']:.1f}%")
    print(f"  step-1 DPO loss: {side_name} {side['train_losses'][0]:.7f}, {name} {b['train_losses'][0]:.7f} "
          f"(relative difference {ratios['step1_loss_rel_diff']:.1e})")
