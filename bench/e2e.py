"""`packtune bench e2e`: whole fine-tuning runs, packtune against transformers + TRL SFTTrainer (a T5,
`--model t5`: against transformers' Seq2SeqTrainer, bench/e2e_t5.py; DPO, `--objective dpo`: against
TRL's DPOTrainer, bench/e2e_dpo.py).

Every side trains the same Llama config from the same random initial weights, on the same records
of generated Alpaca-shaped data (bench/alpaca_like.py), in the same order of magnitude of tokens
per optimizer step, for one epoch over the same first records, with the same learning rate and
schedule, tokenized by the same sentencepiece model. Each run is a fresh process (honest peak
memory, no warm caches), and one judge (transformers' model, eval mode) scores every side's
final weights on the same held-out records. Reported per side: real tokens/s (padding excluded),
label tokens/s, peak resident memory of the training loop, held-out loss, the last training
losses, and CPU MFU against the matmul rate measured on this machine in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from packtune.bench.e2e_common import (
    MODELS,
    alpaca_prompt,
    flops_per_token,
    heldout_loss,
    hf_config,
    matmul_rate,
    read_jsonl,
)
from packtune.bench.e2e_t5 import T5_MODELS

ALL_MODELS = {**MODELS, **T5_MODELS}

IMPLS = ("packtune", "trl-padding", "trl-packing", "packtune-lora", "packtune-qlora", "trl-lora",
         "seq2seq-trainer", "trl-padding-free", "trl-padding-packtune")
DEFAULT_IMPLS = ("packtune", "trl-padding", "trl-packing")
T5_IMPLS = ("packtune", "seq2seq-trainer")
"""The sides of a T5 (`--model t5`), its default too: packtune's packed pairs, transformers'
Seq2SeqTrainer."""
BASELINES = {"packtune": ("trl-padding", "trl-packing", "seq2seq-trainer"), "packtune-lora": ("trl-lora",),
             "packtune-qlora": ("trl-lora", "packtune-lora")}
"""The sides each side is compared with, when both ran (QLoRA also against packtune's own LoRA)."""
LORA_RANK = 16
"""LoRA sides: rank 16, alpha 32, all linear layers, no dropout; judged on the merged model.
packtune-qlora is packtune-lora with its targeted base weights stored as NF4 (`lora.base_dtype`)."""
TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                    "legacy": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "pad_token": "<pad>"}


def lora_rank(impl: str) -> int:
    """The adapters' rank of a side: LORA_RANK for the LoRA sides (their names end in "lora"), else 0."""
    return LORA_RANK if impl.endswith("lora") else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packtune bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", choices=("sft", "dpo"), default="sft",
                   help="sft: instruction tuning (default); dpo: DPO on generated preference pairs against "
                        "TRL's DPOTrainer (sides packtune, trl-padding, trl-padding-free, "
                        "trl-padding-packtune; model small)")
    p.add_argument("--model", action="append", choices=sorted(ALL_MODELS),
                   help="model config(s) to run (repeatable; default: small); t5: a T5 v1.1 against "
                        "Seq2SeqTrainer")
    p.add_argument("--impl", action="append", choices=IMPLS,
                   help="sides to run (repeatable; default: the full fine-tuning ones, packtune and TRL)")
    p.add_argument("--tokens", type=int, default=24_000,
                   help="train on the first records holding about this many tokens (prompt + answer)")
    p.add_argument("--step-tokens", type=int, default=4096,
                   help="about this many real tokens per optimizer step")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="tokens per packed row (packtune, TRL packing)")
    p.add_argument("--padding-batch", type=int, default=4,
                   help="samples per padded micro-batch for TRL padding (Alpaca's recipe uses 4)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3, DPO 1e-4)")
    p.add_argument("--pairs", type=int, default=256, help="--objective dpo: train on this many first pairs")
    p.add_argument("--pairs-per-step", type=int, default=8,
                   help="--objective dpo: pairs per optimizer step (micro-batches of --padding-batch pairs)")
    p.add_argument("--beta", type=float, default=0.1, help="--objective dpo: DPO's beta")
    p.add_argument("--rows", type=int, default=4000, help="rows of generated data (the tokenizer's corpus)")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows for the loss comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for every side and the matmul probe (0: torch's default)")
    p.add_argument("--work", default="bench_results/e2e_work",
                   help="generated data, tokenizer, initial models")
    p.add_argument("--out", default="bench_results", help="folder for e2e.json")
    return p


def prepare(args: argparse.Namespace, models: list[str]) -> dict[str, Any]:
    """Data, tokenizer and one random initial model per config under `args.work` (reused if present)."""
    work = Path(args.work)
    stamp = {"rows": args.rows, "eval_rows": args.eval_rows, "seed": args.seed}
    meta_path = work / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("stamp") != stamp or "input_lengths" not in meta:
        shutil.rmtree(work, ignore_errors=True)
        meta = _generate(work, args)
        meta["stamp"] = stamp
        meta_path.write_text(json.dumps(meta, indent=1))
    for name in models:
        init_dir = work / f"init_{name}"
        if not (init_dir / "config.json").exists():
            if name in T5_MODELS:
                from packtune.bench.e2e_t5 import init_model

                init_model(init_dir, name, work / "tokenizer.model", args.seed)
            else:
                _init_model(init_dir, name, work / "tokenizer.model", args.seed)
    return meta


def _generate(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import sentencepiece as spm

    from packtune.bench.alpaca_like import generate_rows, length_stats
    from packtune.demo.mix import write_jsonl
    from packtune.demo.tokenizer_training import train_tokenizer

    rows = generate_rows(args.rows + args.eval_rows, seed=args.seed)
    train, heldout = rows[:args.rows], rows[args.rows:]
    write_jsonl(train, work / "data.jsonl")
    write_jsonl(heldout, work / "heldout.jsonl")
    model = train_tokenizer((alpaca_prompt(r) + " " + r["output"] for r in train), work / "tokenizer.model",
                            vocab_size=8000, model_type="bpe", seed=args.seed)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    lengths = [(1 + len(sp.encode(alpaca_prompt(r))), len(sp.encode(r["output"])) + 1) for r in train]
    by_row = {id(r): n for r, n in zip(train, lengths, strict=True)}
    stats = length_stats(train, lambda r: by_row[id(r)])
    return {"lengths": [p + a for p, a in lengths], "input_lengths": [p for p, _ in lengths], "stats": stats,
            "tokenizer_vocab": sp.vocab_size()}


def _init_model(init_dir: Path, name: str, tokenizer_model: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    skip = ("architectures", "model_type", "torch_dtype")
    config = hf_config(name)
    kwargs = {k: v for k, v in config.items() if k not in skip}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **kwargs))
    model.save_pretrained(init_dir)
    shutil.copy(tokenizer_model, init_dir / "tokenizer.model")
    (init_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1))


def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    """One side's run, in this process (the worker calls it)."""
    _set_threads(spec["threads"])
    if spec.get("objective") == "dpo":
        from packtune.bench import e2e_dpo

        return e2e_dpo.run_side(spec)
    rank = lora_rank(spec["impl"])
    lora = {"lora_rank": rank} if rank else {}
    if spec["impl"] == "packtune-qlora":
        lora["lora_base_dtype"] = "nf4"
    if spec["impl"].startswith("packtune"):
        from packtune.bench import e2e_packtune

        result = e2e_packtune.run({**spec, **lora})
    elif spec["impl"] == "seq2seq-trainer":
        from packtune.bench import e2e_t5

        result = e2e_t5.run_seq2seq_trainer(spec)
    else:
        from packtune.bench import e2e_trl

        mode = "packing" if lora else spec["impl"].removeprefix("trl-")
        result = e2e_trl.run({**spec, **lora, "mode": mode})
    if spec["model"] in T5_MODELS:
        from packtune.bench import e2e_t5

        result["heldout_loss"] = e2e_t5.heldout_loss(result["model_dir"], read_jsonl(spec["heldout"]),
                                                     spec["tokenizer"])
    else:
        result["heldout_loss"] = heldout_loss(result["model_dir"], read_jsonl(spec["heldout"]))
    return result


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "packtune.bench.e2e", "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        return {"error": lines[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """How many rows hold `--tokens`, and the batch shapes that give ~`--step-tokens` per step."""
    lengths = meta["lengths"]
    rows, total = 0, 0
    while rows < len(lengths) and total < args.tokens:
        total += lengths[rows]
        rows += 1
    mean = total / rows
    rows_per_micro_batch = max(args.step_tokens // args.max_tokens, 1)
    micro_batches_padding = max(round(args.step_tokens / (mean * args.padding_batch)), 1)
    steps = max(round(total / args.step_tokens), 1)
    return {"rows": rows, "tokens": total, "mean_length": mean, "rows_per_micro_batch": rows_per_micro_batch,
            "padding_micro_batches": micro_batches_padding, "warmup": max(round(0.03 * steps), 1),
            "context": sum(n * n for n in lengths[:rows]) / total}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-4 if args.objective == "dpo" else 1e-3
    if args.objective == "dpo":
        return _main_dpo(parser, args)
    dpo_only = sorted(set(args.impl or ()) & {"trl-padding-free", "trl-padding-packtune"})
    if dpo_only:
        parser.error(f"--impl {', '.join(dpo_only)}: a DPO side (--objective dpo)")
    models = args.model or ["small"]
    meta = prepare(args, models)
    shape = plan(args, meta)
    _set_threads(args.threads)
    rate = matmul_rate()
    stats = meta["stats"]
    print(f"packtune bench e2e: {shape['rows']} rows, {shape['tokens']} tokens "
          f"(data: mean {stats['mean']:.0f}, "
          f"median {stats['median']}, p90 {stats['p90']}, max {stats['max']} tokens, "
          f"{100 * stats['response_share']:.1f}% response); fp32 matmul {rate / 1e9:.1f} GFLOP/s")
    work = Path(args.work)
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results = []
    for name in models:
        t5 = name in T5_MODELS
        allowed = T5_IMPLS if t5 else tuple(i for i in IMPLS if i != "seq2seq-trainer")
        impls = [i for i in args.impl or (T5_IMPLS if t5 else DEFAULT_IMPLS) if i in allowed]
        skipped = sorted(set(args.impl or ()) - set(impls))
        if skipped:
            print(f"  {name}: skipping {', '.join(skipped)} (this model runs {', '.join(allowed)})")
        max_tokens = _t5_input_budget(args, meta, shape) if t5 else args.max_tokens
        for impl in impls:
            if t5:
                from packtune.bench.e2e_t5 import pair_flops_per_token

                inputs = meta["input_lengths"][: shape["rows"]]
                pairs = [(i, n - i) for i, n in zip(inputs, meta["lengths"], strict=False)]
                flops = pair_flops_per_token(name, pairs)
            else:
                flops = flops_per_token(hf_config(name), shape["context"], lora_rank(impl))
            padding = impl in ("trl-padding", "seq2seq-trainer")
            spec = {"impl": impl, "model": name, "init_dir": str(work / f"init_{name}"),
                    "out_dir": str(work / f"run_{name}_{impl}"), "data": str(work / "data.jsonl"),
                    "heldout": str(work / "heldout.jsonl"), "tokenizer": str(work / "tokenizer.model"),
                    "rows": shape["rows"], "lr": args.lr, "threads": args.threads,
                    "warmup": shape["warmup"], "seed": args.seed,
                    "max_tokens": max_tokens, "samples_per_micro_batch": args.padding_batch,
                    "rows_per_micro_batch": shape["rows_per_micro_batch"],
                    "micro_batches": shape["padding_micro_batches"] if padding else 1}
            shutil.rmtree(spec["out_dir"], ignore_errors=True)  # no metrics or cache left from a previous run
            print(f"  running {name} / {impl} ...", flush=True)
            res = run_in_subprocess(spec)
            if "error" not in res:
                res["real_tokens_per_s"] = res["real_tokens"] / res["train_s"]
                res["label_tokens_per_s"] = res["label_tokens"] / res["train_s"]
                res["mfu"] = flops * res["real_tokens_per_s"] / rate
            results.append({"subject": "e2e", "model": name, "implementation": impl, "timestamp": stamp,
                            "matmul_flops": rate, "flops_per_token": flops, "plan": shape, "data": stats,
                            **res})
        _print_table(name, [r for r in results if r["model"] == name])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'e2e.json'}")
    return results


def _main_dpo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict[str, Any]]:
    from packtune.bench import e2e_dpo

    if args.model not in (None, ["small"]):
        parser.error("--objective dpo: runs the small Llama (--model small)")
    wrong = sorted(set(args.impl or ()) - set(e2e_dpo.IMPLS))
    if wrong:
        parser.error(f"--objective dpo: no side {', '.join(wrong)} (choose from {', '.join(e2e_dpo.IMPLS)})")
    prepare(args, ["small"])
    _set_threads(args.threads)
    return e2e_dpo.main(args, Path(args.work), run_in_subprocess)


def _t5_input_budget(args: argparse.Namespace, meta: dict[str, Any], shape: dict[str, Any]) -> int:
    """A T5 row's input tokens: the inputs' share of `--max-tokens` (its targets' budget is sized from
    the data, data/pair_rows.py), so that a row holds about `--max-tokens` tokens on both sides together
    and a step as many as the other sides' (at least the longest input: no pair is dropped)."""
    inputs = meta["input_lengths"][: shape["rows"]]
    share = sum(inputs) / shape["tokens"]
    return max(round(args.max_tokens * share), max(inputs))


def _print_table(model: str, rows: list[dict[str, Any]]) -> None:
    print(f"\nmodel {model}: {ALL_MODELS[model]}")
    print(f"{'implementation':<14}{'steps':>6}{'real tok/s':>11}{'label tok/s':>12}{'peak MiB':>10}"
          f"{'held-out':>9}{'last loss':>10}{'MFU':>7}")
    base = {r["implementation"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['implementation']:<14}  failed: {r['error']}")
            continue
        print(f"{r['implementation']:<14}{r['steps']:>6}{r['real_tokens_per_s']:>11.0f}{r['label_tokens_per_s']:>12.0f}"
              f"{r['peak_bytes'] / 2**20:>10.0f}{r['heldout_loss']:>9.3f}{r['train_losses'][-1]:>10.3f}"
              f"{100 * r['mfu']:>6.1f}%")
    for r in rows:
        for name in BASELINES.get(r["implementation"], ()):
            if name in base and "error" not in r:
                b = base[name]
                r[f"speedup_vs_{name}"] = r["real_tokens_per_s"] / b["real_tokens_per_s"]
                r[f"memory_vs_{name}"] = r["peak_bytes"] / max(b["peak_bytes"], 1)
                print(f"  {r['implementation']} vs {name}: {r[f'speedup_vs_{name}']:.2f}x real tokens/s, "
                      f"{r[f'memory_vs_{name}']:.2f}x peak memory, "
                      f"held-out loss {r['heldout_loss']:.3f} vs {b['heldout_loss']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(run_side(json.loads(sys.argv[2]))))
    else:
        main(sys.argv[1:])
