"""The loss curve of a run: a PNG when matplotlib is installed, a plain-text chart otherwise."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path


def read_losses(metrics_path: str | Path) -> tuple[list[int], list[float]]:
    """(steps, losses) from a `metrics.jsonl`, skipping lines without a finite training loss."""
    steps, losses = [], []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            loss = record.get("loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss) and "step" in record:
                steps.append(int(record["step"]))
                losses.append(float(loss))
    return steps, losses


def text_chart(steps: Sequence[int], losses: Sequence[float], width: int = 60, height: int = 12) -> str:
    """A character chart of loss against step: one column per bucket of steps (its mean loss)."""
    if not losses:
        return "(no loss values)"
    width = min(width, len(losses))
    columns = []
    for c in range(width):
        lo, hi = c * len(losses) // width, max((c + 1) * len(losses) // width, c * len(losses) // width + 1)
        columns.append(sum(losses[lo:hi]) / (hi - lo))
    top, bottom = max(columns), min(columns)
    span = (top - bottom) or 1.0
    rows = []
    for r in range(height):
        level = top - span * r / (height - 1)
        marks = "".join("*" if abs(v - level) <= span / (2 * (height - 1)) else " " for v in columns)
        rows.append(f"{level:8.3f} |{marks}")
    rows.append(" " * 9 + "+" + "-" * width)
    rows.append(" " * 10 + f"step {steps[0]}" + f"step {steps[-1]}".rjust(width - len(f"step {steps[0]}")))
    return "\n".join(rows)


def write_curve(metrics_path: str | Path, out_stem: str | Path, title: str = "training loss") -> Path:
    """Write `<out_stem>.png` (matplotlib) or `<out_stem>.txt` (text chart); returns the path written."""
    steps, losses = read_losses(metrics_path)
    out_stem = Path(out_stem)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = out_stem.with_suffix(".txt")
        path.write_text(f"{title}\n{text_chart(steps, losses)}\n", encoding="utf-8")
        return path
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, linewidth=0.8, alpha=0.35, label="per step")
    window = max(len(losses) // 50, 1)
    smooth = [sum(losses[max(i - window + 1, 0):i + 1]) / (i + 1 - max(i - window + 1, 0))
              for i in range(len(losses))]
    ax.plot(steps, smooth, linewidth=1.6, label=f"mean of the last {window} steps")
    ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over label tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_stem.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
