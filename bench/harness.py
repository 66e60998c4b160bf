"""Shared benchmark harness: each (implementation, shape) runs in a fresh subprocess.

A fresh process per measurement makes peak memory honest on CPU: the worker builds the inputs,
resets the kernel's high-water mark (`/proc/self/clear_refs`), runs one step and reads `VmHWM`,
so the figure is the memory the step itself needed above its inputs. On CUDA it uses torch's
peak-allocation counters instead. Time is the median of `repeats` steps after warm-up. Ratios
are always against a baseline measured in the same run.

A subject module provides `make_step(impl, shape, dtype, device) -> Callable[[], object]`: build
the inputs, return a function doing one forward+backward (or whatever is timed).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from packtune.bench.e2e_common import peak_rss_since_reset, reset_peak_rss


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(step: Callable[[], object], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Peak extra memory of one step (bytes) and the median time of `repeats` steps (seconds)."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        reset_peak_rss()
        step()
        peak = peak_rss_since_reset()
    for _ in range(max(warmup - 1, 0)):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "peak_bytes": max(peak, 0)}


def run_in_subprocess(factory: str, impl: str, shape: dict[str, Any], dtype: str, device: str,
                      warmup: int, repeats: int, timeout: float = 1800) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; returns its result or the error it printed."""
    spec = json.dumps({"factory": factory, "impl": impl, "shape": shape, "dtype": dtype,
                       "device": device, "warmup": warmup, "repeats": repeats})
    proc = subprocess.run([sys.executable, "-m", "packtune.bench.harness", spec],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    module, func = spec["factory"].split(":")
    torch.manual_seed(0)
    make_step = getattr(importlib.import_module(module), func)
    step = make_step(spec["impl"], spec["shape"], spec["dtype"], spec["device"])
    print(json.dumps(measure(step, spec["device"], spec["warmup"], spec["repeats"])))


def environment() -> dict[str, str]:
    import packtune

    versions = {"packtune": packtune.__version__, "torch": torch.__version__,
                "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {"machine": machine, **versions}


def bench_parser(subject: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"packtune bench {subject}", description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps, the memory probe included")
    parser.add_argument("--impl", action="append", help="run only these implementations (repeatable)")
    parser.add_argument("--out", default="bench_results", help="folder for the JSON and CSV results")
    return parser


def run_table(subject: str, factory: str, impls: Sequence[str], shapes: Sequence[dict[str, Any]],
              baseline: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every (shape, implementation), print a table with ratios to `baseline`, write JSON/CSV."""
    impls = [i for i in impls if not args.impl or i in args.impl or i == baseline]
    env = environment()
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    rows = []
    print(f"packtune bench {subject}: {args.device}, {args.dtype}, {env['machine']}, torch {env['torch']}")
    labels = [",".join(f"{k}={v}" for k, v in shape.items()) for shape in shapes]
    width = max(len(label) for label in [*labels, "shape"]) + 2
    print(f"{'shape':<{width}}{'implementation':<22}"
          f"{'median ms':>11}{'peak MiB':>10}{'speedup':>9}{'memory':>8}")
    for shape, label in zip(shapes, labels, strict=True):
        results = {}
        for impl in impls:
            res = run_in_subprocess(factory, impl, shape, args.dtype, args.device, args.warmup, args.repeats)
            results[impl] = res
        base = results.get(baseline, {})
        for impl, res in results.items():
            row = {"subject": subject, "implementation": impl, "shape": shape, "dtype": args.dtype,
                   "device": args.device, "timestamp": stamp, **env, **res}
            if "error" in res:
                print(f"{label:<{width}}{impl:<22}  failed: {res['error']}")
            else:
                speedup = base["median_s"] / res["median_s"] if "median_s" in base else float("nan")
                mem_ratio = res["peak_bytes"] / base["peak_bytes"] if base.get("peak_bytes") else float("nan")
                row.update(speedup_vs_baseline=speedup, memory_vs_baseline=mem_ratio)
                print(f"{label:<{width}}{impl:<22}{res['median_s'] * 1e3:>11.1f}"
                      f"{res['peak_bytes'] / 2**20:>10.1f}{speedup:>8.2f}x{mem_ratio:>8.2f}")
            rows.append(row)
    write_results(subject, rows, Path(args.out))
    return rows


def write_results(subject: str, rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{subject}.json").write_text(json.dumps(rows, indent=1))
    flat = [{**r, "shape": ",".join(f"{k}={v}" for k, v in r["shape"].items())} for r in rows]
    keys = sorted({k for r in flat for k in r})
    with open(out / f"{subject}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    print(f"results: {out / (subject + '.json')}, {out / (subject + '.csv')}")

if __name__ == "__main__":
    _worker(sys.argv[1])
