"""`packtune bench pack`: packing efficiency and speed, and tokenization against `datasets.map`.

1. Share of real tokens per row on a generated Alpaca-like length distribution (mean about 200
   tokens, long tail to 2K) for pad-to-longest micro-batches of 4, next-fit in dataset order
   (torchtune-like), first-fit in shuffled order (axolotl-like), packtune's best-fit decreasing
   and packtune's `shuffle` strategy (random order, fullest of 16 open rows), at max_tokens
   512 / 2048 / 4096 (samples longer than max_tokens are left out, as `drop` does).
2. Time to pack 1M lengths with best-fit decreasing (C++ op and the Python fallback) and with
   the `shuffle` strategy.
3. Tokenizing generated Alpaca-like records with the same sentencepiece model: packtune's
   `prepare_dataset` (render, segment-wise encode, decode check, masks) against Hugging Face
   `datasets.map` doing the Stanford Alpaca preprocessing (encode prompt and prompt+answer, mask the
   prompt), plus packtune's cached second load. Needs `pip install datasets` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from packtune.bench.harness import environment
from packtune.data.packing import _extension_available, best_fit_decreasing, shuffled_best_fit


def alpaca_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(5.1, 0.6, n), 8, 2048).astype(np.int64)


def pad_to_longest(lengths: np.ndarray, batch: int, seed: int) -> float:
    perm = np.random.default_rng(seed).permutation(len(lengths))
    groups = lengths[perm][: len(lengths) // batch * batch].reshape(-1, batch)
    return float(groups.sum() / (groups.max(axis=1) * batch).sum())


def next_fit(lengths: np.ndarray, capacity: int) -> int:
    rows, room = 0, 0
    for n in lengths.tolist():
        if n > room:
            rows, room = rows + 1, capacity
        room -= n
    return rows


def first_fit(lengths: np.ndarray, capacity: int) -> int:
    """First fit with a max segment tree over row rooms: the leftmost row with room >= n."""
    size = 1 << max(1, (len(lengths) - 1).bit_length())
    tree = [0] * (2 * size)
    rows = 0
    for n in lengths.tolist():
        if tree[1] >= n:
            i = 1
            while i < size:
                i = 2 * i if tree[2 * i] >= n else 2 * i + 1
            leaf = i - size
        else:
            leaf, rows = rows, rows + 1
            i = leaf + size
            tree[i] = capacity
        i = leaf + size
        tree[i] -= n
        i //= 2
        while i:
            tree[i] = max(tree[2 * i], tree[2 * i + 1])
            i //= 2
    return rows


def efficiency_table(n: int, seed: int) -> list[dict]:
    results = []
    all_lengths = alpaca_like_lengths(n, seed)
    for capacity in (512, 2048, 4096):
        lengths = all_lengths[all_lengths <= capacity]
        shuffled = lengths[np.random.default_rng(seed).permutation(len(lengths))]
        total = lengths.sum()
        rows_bfd = int(best_fit_decreasing(lengths, capacity).max()) + 1
        rows_shuffle = int(shuffled_best_fit(lengths, capacity, seed).max()) + 1
        for method, value in (
            ("pad to longest (B=4)", pad_to_longest(lengths, 4, seed)),
            ("next-fit, dataset order", total / (next_fit(lengths, capacity) * capacity)),
            ("first-fit, shuffled", total / (first_fit(shuffled, capacity) * capacity)),
            ("packtune BFD", total / (rows_bfd * capacity)),
            ("packtune shuffle", total / (rows_shuffle * capacity)),
        ):
            results.append(
                {
                    "measure": "efficiency",
                    "max_tokens": capacity,
                    "method": method,
                    "value": float(value),
                    "samples": len(lengths),
                }
            )
    return results


def pack_speed(n: int, repeats: int) -> list[dict]:
    lengths = alpaca_like_lengths(n, 1)
    packers = [(f"packtune BFD ({backend})", lambda b=backend: best_fit_decreasing(lengths, 2048, backend=b))
               for backend in (["cpp"] if _extension_available() else []) + ["python"]]
    packers.append(("packtune shuffle (python)", lambda: shuffled_best_fit(lengths, 2048)))
    results = []
    for method, pack in packers:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            pack()
            times.append(time.perf_counter() - start)
        results.append(
            {
                "measure": "pack_seconds",
                "max_tokens": 2048,
                "method": method,
                "value": statistics.median(times),
                "samples": n,
            }
        )
    return results


def write_rows(path: Path, n: int, seed: int) -> None:
    """Alpaca-like records over a Zipf-distributed vocabulary of 5000 made-up words."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab = list(dict.fromkeys("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(6000)))[
        :5000
    ]
    weights = [1 / (rank + 1) for rank in range(len(vocab))]

    def text(k: int) -> str:
        words = rng.choices(vocab, weights, k=k)
        return " ".join(w + ("." if rng.random() < 0.08 else "") for w in words)

    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            record = {
                "instruction": text(rng.randint(4, 30)),
                "input": text(rng.randint(2, 40)) if rng.random() < 0.4 else "",
                "output": text(max(1, min(int(rng.lognormvariate(3.9, 0.7)), 1500))),
            }
            f.write(json.dumps(record) + "\n")


def train_tokenizer(folder: Path, data: Path) -> Path:
    import sentencepiece as spm

    lines = [json.loads(line) for line in data.read_text().splitlines()[:20000]]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(r["instruction"] + "\n" + r["output"] for r in lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "sp"),
        vocab_size=4000,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
        num_threads=2,
    )
    return folder / "sp.model"


def hf_datasets_map(data: Path, model: Path, cache: Path, num_proc: int | None) -> int:
    """Stanford Alpaca's preprocessing through `datasets.map`: prompt and prompt+answer+EOS encoded,
    the prompt's tokens masked with -100."""
    import datasets
    import sentencepiece as spm

    from packtune.data.builtin_templates import ALPACA_SYSTEM, ALPACA_SYSTEM_INPUT

    sp = spm.SentencePieceProcessor(model_file=str(model))

    def preprocess(batch):
        sources = [
            (
                f"{ALPACA_SYSTEM_INPUT}\n\n### Instruction:\n{i}\n\n### Input:\n{x}\n\n### Response:"
                if x
                else f"{ALPACA_SYSTEM}\n\n### Instruction:\n{i}\n\n### Response:"
            )
            for i, x in zip(batch["instruction"], batch["input"], strict=True)
        ]
        full = sp.encode([s + o for s, o in zip(sources, batch["output"], strict=True)])
        prompt = sp.encode(sources)
        input_ids = [[sp.bos_id(), *f, sp.eos_id()] for f in full]
        labels = [[-100] * (len(p) + 1) + ids[len(p) + 1 :] for p, ids in zip(prompt, input_ids, strict=True)]
        return {"input_ids": input_ids, "labels": labels}

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    ds = ds.map(preprocess, batched=True, remove_columns=ds.column_names, num_proc=num_proc)
    return sum(len(x) for x in ds["input_ids"])


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(method: str, rows: int, fn) -> dict:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    tokens = fn()
    return {
        "measure": "tokenize_seconds",
        "method": method,
        "value": time.perf_counter() - wall,
        "cpu_seconds": _cpu_seconds() - cpu,
        "rows": rows,
        "tokens": tokens,
    }


def tokenize_speed(rows: int, workers: int) -> list[dict]:
    from packtune.config import DataConfig
    from packtune.data import prepare_dataset

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "alpaca.jsonl"
        write_rows(data, rows, 0)
        model = train_tokenizer(folder, data)

        def packtune(n_workers: int, cache: str) -> int:
            cfg = DataConfig(
                path=str(data), tokenizer=str(model), max_tokens=4096, cache_dir=str(folder / cache)
            )
            return int(prepare_dataset(cfg, num_workers=n_workers).report["tokens"])

        for n in dict.fromkeys((1, workers)):
            results.append(
                _timed(f"packtune prepare ({n} worker(s))", rows, lambda n=n: packtune(n, f"c{n}"))
            )
        results.append(_timed("packtune prepare (cache hit)", rows, lambda: packtune(workers, f"c{workers}")))
        try:
            for num_proc in (None, workers):
                results.append(
                    _timed(
                        f"datasets.map (num_proc={num_proc})",
                        rows,
                        lambda p=num_proc: hf_datasets_map(data, model, folder / f"hf{p}", p),
                    )
                )
        except ImportError:
            print("datasets is not installed (pip install datasets): skipping the datasets.map baseline")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="packtune bench pack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=100_000, help="lengths for the efficiency table")
    parser.add_argument("--pack-samples", type=int, default=1_000_000, help="lengths for the packing time")
    parser.add_argument(
        "--rows", type=int, default=100_000, help="Alpaca-like rows for the tokenization race"
    )
    parser.add_argument("--workers", type=int, default=2, help="packtune tokenizer workers (and num_proc)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-tokenize", action="store_true", help="only the packing measurements")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    env = environment()
    print(f"packtune bench pack: {env['machine']}")
    results = efficiency_table(args.samples, 0)
    print(
        f"\nshare of real tokens per row ({args.samples} Alpaca-like lengths, mean "
        f"{alpaca_like_lengths(args.samples).mean():.0f}):"
    )
    methods = list(dict.fromkeys(r["method"] for r in results))
    print(f"{'method':<28}" + "".join(f"{c:>10}" for c in (512, 2048, 4096)))
    for method in methods:
        values = {r["max_tokens"]: r["value"] for r in results if r["method"] == method}
        print(f"{method:<28}" + "".join(f"{100 * values[c]:>9.2f}%" for c in (512, 2048, 4096)))
    speed = pack_speed(args.pack_samples, args.repeats)
    print(f"\ntime to pack {args.pack_samples} lengths into rows of 2048 (median of {args.repeats}):")
    for r in speed:
        print(f"{r['method']:<28}{r['value']:>9.3f} s")
    results += speed
    if not args.skip_tokenize:
        tok = tokenize_speed(args.rows, args.workers)
        base = next((r["value"] for r in tok if r["method"] == "datasets.map (num_proc=None)"), None)
        print(
            f"\ntokenizing {args.rows} Alpaca-like rows (same sentencepiece model); wall, CPU time, "
            "speedup vs datasets.map:"
        )
        for r in tok:
            ratio = f"{base / r['value']:>7.2f}x" if base else ""
            print(
                f"{r['method']:<34}{r['value']:>8.2f} s {r['cpu_seconds']:>8.2f} cpu-s "
                f"{r['tokens']:>10} tokens {ratio}"
            )
        results += tok
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = [{"subject": "pack", "timestamp": stamp, **env, **r} for r in results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pack.json").write_text(json.dumps(rows, indent=1))
    keys = sorted({k for r in rows for k in r})
    with (out / "pack.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out / 'pack.json'} and {out / 'pack.csv'}")
