"""A run's output directory: what a new `packtune train` may do with what is already there.

A packtune run's output_dir holds only packtune's own files: `config.toml`, `run.json`,
`metrics.jsonl`, `checkpoints/`, `final/`, `run.lock` (packtune.runlock: the live run's lock, empty when
none runs), and packtune's temporary names while they are written.
`run.json` is the run's marker, replaced atomically (temp file, fsync, rename): written
`{"status": "running"}` when the run starts and `{"status": "complete", ...}` (steps, tokens,
tokens/s, final/) as the run's very last act, so a run is finished exactly when run.json says so
(a directory of an older packtune without run.json counts as finished when it holds `final/`).

`plan_run` decides before anything is written, and the same on every rank:
- missing or empty: a new run;
- holding anything packtune does not write: foreign, refused;
- finished: with the same config, "already complete" and nothing is touched; else refused;
- unfinished: with the same config, resumed from its newest checkpoint (`resume = "auto"`) or
  restarted when it has none; with a changed config, or `resume = "never"` over its checkpoints,
  refused (a resume would mix two configs, a restart would overwrite the checkpoints);
- an explicit checkpoint directory in `train.resume`: resumed from it, whatever the state;
- `train.overwrite` (`--overwrite`): a new run; what was there is first moved aside to
  `<output_dir>.replaced-<YYYYmmdd-HHMMSS>` (never deleted: remove it yourself when done with it),
  never while another run holds the directory's lock (the run takes the lock before `start_run`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from packtune.atomic_write import write_atomic
from packtune.config import Config, dump_config, load_config
from packtune.errors import ConfigError
from packtune.runlock import LOCK_NAME

RUN_FILES = frozenset(
    {"config.toml", "run.json", "metrics.jsonl", "checkpoints", "final", "final-merged", "tensorboard",
     "wandb"}
)
_TEMP_PREFIXES = (".write-test-", ".final.", ".final-merged.", ".run.json.", ".config.toml.")
# Keys that change how a run is executed, logged or saved, not what it trains: a resume may change them.
# (train.micro_batches too, where world_size x micro_batches stays the same: `plan_run`.)
_RESUMABLE_KEYS = frozenset({
    "train.resume", "train.overwrite", "train.log_every", "train.save_every", "train.keep_checkpoints",
    "train.eval_every", "train.eval_generate_every", "train.max_bad_steps", "train.on_save_error",
    "train.device", "train.compile", "train.activation_checkpointing", "train.report_to", "train.progress",
    "data.num_workers", "data.cache_dir",
})
_MAX_LISTED = 5


@dataclass(frozen=True)
class RunPlan:
    """What to do with `output_dir`: `complete` (nothing), or start with `move_aside` first."""

    output_dir: Path
    complete: bool = False
    move_aside: bool = False
    marker: dict[str, Any] | None = None
    """The finished run's run.json (for the "already complete" message)."""


def plan_run(cfg: Config) -> RunPlan:
    """Inspect `train.output_dir` (read only) and decide; raises ConfigError, naming why and the fix."""
    t = cfg.train
    out = Path(t.output_dir)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    entries = [name for name in entries if not name.startswith(_TEMP_PREFIXES) and name != LOCK_NAME]
    if not entries:
        return RunPlan(out)
    if t.overwrite:
        return RunPlan(out, move_aside=True)
    hint = f"choose another train.output_dir, or pass --overwrite (moves {out} aside, deletes nothing)"
    foreign = [name for name in entries if name not in RUN_FILES]
    if foreign:
        listed = ", ".join(foreign[:_MAX_LISTED]) + (", ..." if len(foreign) > _MAX_LISTED else "")
        raise ConfigError(f"train.output_dir: {out} holds files that are not a packtune run's ({listed}); "
                          f"{hint}")
    if t.resume not in ("auto", "never"):  # an explicit checkpoint: the user says which state to continue
        return RunPlan(out)
    marker = read_marker(out)
    finished = (marker or {}).get("status") == "complete" or (marker is None and (out / "final").is_dir())
    # A resume may change micro_batches when world_size x micro_batches stays the same: for an unfinished
    # run its checkpoint's sampler state checks that (it knows the group its rows were dealt in, and names
    # the micro_batches that resumes); for a finished run, run.json's world_size does.
    group_kept = not finished or _same_group(marker, out / "config.toml", cfg)
    changed = config_changes(cfg, out / "config.toml", micro_batches_may_differ=group_kept)
    if finished:
        if changed:
            raise ConfigError(f"train.output_dir: {out} holds a finished run with a different config "
                              f"({changed}); {hint}")
        return RunPlan(out, complete=True, marker=marker)
    if changed:
        raise ConfigError(f"train.output_dir: {out} holds an unfinished run with a different config "
                          f"({changed}); resume it with its own config ({out / 'config.toml'}), or {hint}")
    if t.resume == "never" and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ConfigError(f"train.output_dir: {out} holds checkpoints of an unfinished run that "
                          f"train.resume = 'never' would overwrite; set train.resume = 'auto' to continue "
                          f"it, or {hint}")
    return RunPlan(out)


def config_changes(cfg: Config, stored: Path, *, micro_batches_may_differ: bool = False) -> str:
    """'' when `stored` (a run's config.toml) trains what `cfg` trains, else the differences."""
    if not stored.is_file():
        return f"it has no {stored.name}"
    try:
        with warnings.catch_warnings():  # a key renamed since that run saved it is packtune's own
            warnings.simplefilter("ignore", FutureWarning)
            old = load_config(stored).to_dict()
    except ConfigError as e:
        return f"its {stored.name} does not load: {e}"
    new = cfg.to_dict()
    resumable = _RESUMABLE_KEYS | ({"train.micro_batches"} if micro_batches_may_differ else set())
    diffs = [
        f"{section}.{key}: {old[section][key]!r} there, {value!r} now"
        for section, table in new.items()
        for key, value in table.items()
        if f"{section}.{key}" not in resumable and old[section][key] != value
    ]
    more = f"; ... ({len(diffs) - _MAX_LISTED} more)" if len(diffs) > _MAX_LISTED else ""
    return "; ".join(diffs[:_MAX_LISTED]) + more


def _same_group(marker: dict[str, Any] | None, stored: Path, cfg: Config) -> bool:
    """Whether the finished run's world_size x micro_batches (run.json, config.toml) is this one's (the
    sampler then deals the same rows: 2 ranks x 1 micro-batch are 1 process x 2)."""
    ran_on = (marker or {}).get("world_size")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            old = load_config(stored).train.micro_batches
    except (ConfigError, OSError):
        return False
    return ran_on is not None and ran_on * old == world_size() * cfg.train.micro_batches


def start_run(cfg: Config, plan: RunPlan) -> Path | None:
    """Rank 0, after `plan_run`: move an overwritten run aside, write config.toml and mark the run
    running. Returns where the old contents went (None if nothing was moved)."""
    moved = None
    if plan.move_aside:
        moved = _aside_path(plan.output_dir.resolve())
        try:
            os.replace(plan.output_dir, moved)
        except OSError as e:
            raise ConfigError(f"train.overwrite: cannot move {plan.output_dir} aside to {moved}: "
                              f"{e.strerror or e}; move or delete it yourself") from None
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    # `overwrite` is an action, not a property of the run: `packtune train <run>/config.toml` must not
    # move the run it describes aside.
    resolved = replace(cfg, train=replace(cfg.train, overwrite=False))
    write_atomic(plan.output_dir / "config.toml", dump_config(resolved))
    write_marker(plan.output_dir, {"status": "running", "started": _now(), "world_size": world_size()})
    return moved


def world_size() -> int:
    """The ranks of this run (torchrun's WORLD_SIZE; 1 without torchrun), known before they join."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def read_marker(output_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((output_dir / "run.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(output_dir: Path, fields: dict[str, Any]) -> None:
    """Replace `<output_dir>/run.json` atomically: a reader sees the old marker or the new one."""
    write_atomic(output_dir / "run.json", json.dumps({"format": "packtune-run", **fields}, indent=1) + "\n")


def finish_run(output_dir: Path, steps: int, tokens: int, seconds: float, final: Path | None) -> str:
    """Mark the run complete (its last write) and return the line that ends it."""
    rate = tokens / seconds if seconds > 0 else 0.0
    write_marker(output_dir, {"status": "complete", "steps": steps, "world_size": world_size(),
                              "finished": _now(), "tokens": tokens,
                              "train_seconds": round(seconds, 3), "tokens_per_s": round(rate, 1),
                              "final": None if final is None else final.name})
    where = f"final model: {final}" if final is not None else "no final/ (train.export = false)"
    return (f"done: {steps} steps, {tokens} tokens in {seconds:.1f} s of training ({rate:.0f} tokens/s "
            f"overall); {where}")


def complete_message(plan: RunPlan) -> str:
    marker = plan.marker or {}
    final = plan.output_dir / "final"
    steps = f"{marker['steps']} steps, " if "steps" in marker else ""
    model = f"final model: {final}" if final.is_dir() else "no final/ (train.export = false)"
    return (f"{plan.output_dir}: this run is already complete ({steps}{model}); nothing to do. "
            "To train it again pass --overwrite (moves the old run aside) or choose another train.output_dir")


def _aside_path(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
        n += 1
    return candidate


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
