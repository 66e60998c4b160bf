"""Run visibility beyond metrics.jsonl: TensorBoard and Weights & Biases, through their own libraries.

`[train] report_to = ["tensorboard", "wandb"]` (empty by default) sends every record written to
metrics.jsonl (loss, lr, grad norm, tokens/s, label tokens/s, MFU, memory, eval metrics) to each
reporter under the same names (`train/loss`, `eval/loss`, ...), with the run's resolved config.
TensorBoard writes event files to `<output_dir>/tensorboard`; W&B runs offline into
`<output_dir>/wandb` unless `WANDB_API_KEY` is set (`WANDB_PROJECT` names the project). Both are
optional extras (`pip install "packtune[report]"`); asking for one that is not installed is an error
before the run starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from packtune.config import Config, dump_config
from packtune.errors import ConfigError

REPORTERS = ("tensorboard", "wandb")


class Reporter(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers under reporter names: eval_* -> eval/*, the rest train/*."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


class TensorBoardReporter:
    def __init__(self, output_dir: Path, cfg: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.writer.add_text("config", "```toml\n" + dump_config(cfg) + "\n```")

    def log(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, output_dir: Path, cfg: Config) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "packtune"),
            name=output_dir.name,
            dir=str(output_dir),
            config=cfg.to_dict(),
            mode="online" if os.environ.get("WANDB_API_KEY") else "offline",
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


_MODULES = {"tensorboard": ("tensorboard", TensorBoardReporter), "wandb": ("wandb", WandbReporter)}


def check_reporters(names: list[str]) -> None:
    """Unknown names and missing packages are config errors, before anything is written."""
    import importlib.util

    for name in names:
        if name not in _MODULES:
            raise ConfigError(f"train.report_to: unknown reporter {name!r}; valid: {', '.join(REPORTERS)}")
        if importlib.util.find_spec(_MODULES[name][0]) is None:
            raise ConfigError(
                f"train.report_to: {name} needs the `{_MODULES[name][0]}` package "
                '(pip install "packtune[report]")'
            )


def open_reporters(cfg: Config) -> list[Reporter]:
    """The reporters `train.report_to` names, writing under the run's output_dir."""
    output_dir = Path(cfg.train.output_dir)
    return [_MODULES[name][1](output_dir, cfg) for name in dict.fromkeys(cfg.train.report_to)]
