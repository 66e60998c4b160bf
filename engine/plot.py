"""`packtune plot RUN_DIR [RUN_DIR ...] --out FILE.png`: a run's curves from its metrics.jsonl.

Three panels (loss with the eval loss dashed, learning rate, tokens/s), one colour per run, so
runs are compared without a notebook. Needs matplotlib (the `demo` extra).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records) of a metrics.jsonl, non-finite values left out."""
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if isinstance(record.get("loss"), (int, float)) and math.isfinite(record["loss"]):
                train.append(record)
            elif "eval_loss" in record:
                evals.append(record)
    return train, evals


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, smooth: int = 0) -> Path:
    """Write the curves of every run in `run_dirs` (folders holding metrics.jsonl) to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for k, run in enumerate(run_dirs):
        metrics = Path(run) / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{run}: no metrics.jsonl (is it a packtune run folder?)")
        train, evals = read_metrics(metrics)
        colour, name = f"C{k}", Path(run).name
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        window = smooth or max(len(losses) // 50, 1)
        if window > 1:
            ax_loss.plot(steps, losses, color=colour, linewidth=0.6, alpha=0.3)
        ax_loss.plot(steps, _moving_mean(losses, window), color=colour, linewidth=1.5, label=f"{name} train")
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], color=colour,
                         linestyle="--", marker="o", markersize=3, label=f"{name} eval")
        for ax, key in ((ax_lr, "lr"), (ax_tps, "tokens_per_s")):
            have = [r for r in train if isinstance(r.get(key), (int, float))]
            ax.plot([r["step"] for r in have], [r[key] for r in have], color=colour, label=name)
    ax_loss.set_ylabel("loss (mean over label tokens)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_xlabel("optimizer step")
    for ax in (ax_loss, ax_lr, ax_tps):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _moving_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(i - window + 1, 0) : i + 1]) / (i + 1 - max(i - window + 1, 0))
            for i in range(len(values))]
