"""Step metrics: `metrics.jsonl` (one JSON object per optimizer step) and a progress line.

Per-step values that live on the device (loss, grad norm, the NaN/inf flag) are buffered as
tensors and read back together every `log_every` steps, so logging costs one host sync per
window rather than one per step. Throughput is measured over the window.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from packtune.atomic_write import write_atomic

# Dense bf16 peak TFLOPS per GPU, matched against torch.cuda.get_device_name (first hit wins).
_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("4090", 165.0),
)


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (CPUs, unlisted GPUs): no MFU then."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class _Pending:
    step: int
    lr: float
    tokens: int
    label_tokens: int
    flops: float
    values: torch.Tensor
    """[loss, grad_norm, finite, *extra] on the device."""
    extra: tuple[str, ...] = ()
    """The names of the values after the first three (a mixture of experts' router metrics)."""


@dataclass
class MetricsLogger:
    """Collects steps; `flush()` writes them to metrics.jsonl and prints the progress line."""

    path: Path | None
    total_steps: int
    world_size: int
    peak_flops: float | None
    device: torch.device
    stream: Any = None
    """Where the progress line goes (None: sys.stdout at the time of printing)."""
    max_bad_steps: int = 0
    reporters: list = field(default_factory=list)
    """Each record also goes to these (packtune.reporters: TensorBoard, W&B)."""
    progress: str = "line"
    """bar (tqdm, with ETA), line (one line per flush) or none."""
    _bar: Any = None
    _pending: list[_Pending] = field(default_factory=list)
    _window_start: float = field(default_factory=time.perf_counter)
    run_tokens: int = 0
    """Tokens (all ranks) and seconds of the steps flushed so far: the run's overall throughput."""
    run_seconds: float = 0.0
    bad_in_a_row: int = 0
    skipped_steps: int = 0

    def start_window(self) -> None:
        """Time the next flushed steps from now (e.g. after loading a checkpoint, whose time is
        no step's)."""
        self._window_start = time.perf_counter()

    def record(
        self, step: int, lr: float, tokens: int, label_tokens: int, flops: float, values: torch.Tensor,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """`values` [loss, grad_norm, finite] and `extra` named scalars, all on the device (read at
        the next flush)."""
        extra = extra or {}
        if extra:
            values = torch.cat([values, torch.stack([v.float() for v in extra.values()])])
        self._pending.append(_Pending(step, lr, tokens, label_tokens, flops, values.detach(), tuple(extra)))

    def flush(self) -> list[dict[str, Any]]:
        """Sync once, write every buffered step, print one line; returns the records."""
        if not self._pending:
            return []
        flat = torch.cat([p.values for p in self._pending]).tolist()  # one sync
        values, start = [], 0
        for p in self._pending:
            values.append(flat[start : start + p.values.numel()])
            start += p.values.numel()
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        tokens = sum(p.tokens for p in self._pending)
        self.run_tokens += tokens
        self.run_seconds += elapsed
        labels = sum(p.label_tokens for p in self._pending)
        flops = sum(p.flops for p in self._pending)
        mfu = flops / elapsed / self.world_size / self.peak_flops if self.peak_flops else None
        memory = peak_memory_gib(self.device)
        records = []
        for p, (loss, grad_norm, finite, *extra) in zip(self._pending, values, strict=False):
            skipped = not finite
            self.skipped_steps += skipped
            self.bad_in_a_row = self.bad_in_a_row + 1 if skipped else 0
            records.append({
                "step": p.step,
                "loss": _finite_or_none(loss),
                "lr": p.lr,
                "grad_norm": _finite_or_none(grad_norm),
                "tokens": p.tokens,
                "label_tokens": p.label_tokens,
                "tokens_per_s": tokens / elapsed,
                "label_tokens_per_s": labels / elapsed,
                "mfu": mfu,
                "peak_memory_gib": memory,
                "skipped": skipped,
                "skipped_total": self.skipped_steps,
                **{name: _finite_or_none(value) for name, value in zip(p.extra, extra, strict=True)},
            })
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            for reporter in self.reporters:
                for r in records:
                    reporter.log(r)
            self._show(records, len(records) / elapsed, *values[-1][:2])
        self._pending.clear()
        self._window_start = time.perf_counter()
        return records

    def _show(self, records: list[dict[str, Any]], steps_per_s: float, loss: float, grad_norm: float) -> None:
        r = records[-1]
        if self.progress == "bar":
            from tqdm import tqdm

            if self._bar is None:
                self._bar = tqdm(total=self.total_steps, initial=records[0]["step"] - 1, unit="step",
                                 file=self.stream, dynamic_ncols=True)
            self._bar.update(len(records))
            self._bar.set_postfix_str(f"loss {loss:.4f} | tok/s {r['tokens_per_s']:.0f}")
            return
        if self.progress == "line":
            self._print(r, steps_per_s, loss, grad_norm)

    def close(self) -> None:
        """Close the progress bar and the reporters."""
        if self._bar is not None:
            self._bar.close()
        for reporter in self.reporters:
            reporter.close()

    def _print(self, r: dict[str, Any], steps_per_s: float, loss: float, grad_norm: float) -> None:
        remaining = (self.total_steps - r["step"]) / steps_per_s if steps_per_s > 0 else 0.0
        parts = [
            f"step {r['step']}/{self.total_steps}",
            f"loss {loss:.4f}",
            f"lr {r['lr']:.3g}",
            f"grad_norm {grad_norm:.3f}",
            f"tok/s {r['tokens_per_s']:.0f}",
            f"label tok/s {r['label_tokens_per_s']:.0f}",
        ]
        if r.get("rewards/accuracies") is not None:
            parts.append(f"reward acc {100 * r['rewards/accuracies']:.0f}%")
        if r["mfu"] is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        parts += [f"mem {r['peak_memory_gib']:.2f}GiB", f"eta {_duration(remaining)}"]
        if r["skipped_total"]:
            parts.append(f"skipped {r['skipped_total']}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def log_eval(self, step: int, loss: float, label_tokens: int,
                 metrics: dict[str, float] | None = None) -> None:
        """The held-out loss, and a preference objective's metrics (as `eval_rewards/accuracies`, ...)."""
        metrics = metrics or {}
        line = f"step {step}/{self.total_steps} | eval loss {loss:.4f} ({label_tokens} label tokens)"
        if "rewards/accuracies" in metrics:
            line += f", reward accuracy {100 * metrics['rewards/accuracies']:.1f}%"
        self._write_eval(
            {"step": step, "eval_loss": loss, "eval_label_tokens": label_tokens,
             **{f"eval_{k}": _finite_or_none(v) for k, v in metrics.items()}},
            line,
        )

    def log_generation_eval(self, step: int, scores: dict[str, Any]) -> None:
        """`[train] eval_data` scores (packtune eval's), as `eval_<metric>` keys of one record."""
        self._write_eval(
            {"step": step, **{f"eval_{k}": v for k, v in scores.items() if k != "per_task"}},
            f"step {step}/{self.total_steps} | eval exact match {100 * scores['exact_match']:.1f}%, "
            f"ROUGE-L {100 * scores['rouge_l']:.1f} ({scores['rows']} records)",
        )

    def _write_eval(self, record: dict[str, Any], line: str) -> None:
        """An eval record to metrics.jsonl and the reporters, its line to the progress output."""
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for reporter in self.reporters:
            reporter.log(record)
        if self.progress == "bar" and self._bar is not None:
            self._bar.write(line)
        elif self.progress != "none":
            print(line, file=self.stream, flush=True)


def _finite_or_none(x: float) -> float | None:
    """metrics.jsonl stays strict JSON: a NaN/inf value is written as null (and `skipped`)."""
    return x if math.isfinite(x) else None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of metrics.jsonl after `step`, the checkpoint a run resumes from (those steps
    will be redone), atomically: a kill during the rewrite leaves the old file whole."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    write_atomic(path, "".join(line + "\n" for line in kept))
