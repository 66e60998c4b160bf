"""The loss curve of a run: `packtune plot`'s PNG when matplotlib is installed, a text chart otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from packtune.atomic_write import write_atomic


def read_losses(metrics_path: str | Path) -> tuple[list[int], list[float]]:
    """(steps, losses) from a `metrics.jsonl`, skipping lines without a finite training loss."""
    from packtune.plot import read_metrics

    train, _ = read_metrics(metrics_path)
    return [int(r["step"]) for r in train], [float(r["loss"]) for r in train]


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
    lines = []
    for r in range(height):
        level = top - span * r / (height - 1)
        marks = "".join("*" if abs(v - level) <= span / (2 * (height - 1)) else " " for v in columns)
        lines.append(f"{level:8.3f} |{marks}")
    lines.append(" " * 9 + "+" + "-" * width)
    lines.append(" " * 10 + f"step {steps[0]}" + f"step {steps[-1]}".rjust(width - len(f"step {steps[0]}")))
    return "\n".join(lines)


def write_curve(run_dir: str | Path, out_stem: str | Path, title: str = "training loss") -> Path:
    """Write `<out_stem>.png` (`packtune plot`'s curves, with matplotlib) or `<out_stem>.txt` (a text
    chart); returns the path written."""
    out_stem = Path(out_stem)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        steps, losses = read_losses(Path(run_dir) / "metrics.jsonl")
        return write_atomic(out_stem.with_suffix(".txt"), f"{title}\n{text_chart(steps, losses)}\n")
    from packtune.plot import plot_runs

    return plot_runs([run_dir], out_stem.with_suffix(".png"))
