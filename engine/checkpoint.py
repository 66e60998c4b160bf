"""Resumable training checkpoints with PyTorch distributed checkpoint (DCP).

Layout: `<output_dir>/checkpoints/step_00000120/` holds the DCP files (the trainable model and
optimizer tensors, each rank writing its own shards, reshardable on load; a LoRA run's frozen
base is not saved) plus `extra_rank<r>.pt` (per-rank plain state: step, scheduler, sampler
rows dealt, RNG, optimizer hyper-parameters).
A checkpoint is written into `step_XXXXXXXX.tmp`; once every rank has finished, rank 0 writes
`manifest.json` (every rank's files with size and CRC-32, packtune.manifest) and renames the
directory, so a directory without the suffix was complete when written and `verify` tells whether
it still is. A run killed mid-write leaves only a `.tmp` directory, which the next save deletes.
A resume takes the newest checkpoint that verifies and names each newer one it skips; rotation
(`keep`) deletes only checkpoints older than the newest `keep` verified ones. A save that fails for
want of storage (packtune.storage) removes its partial files and raises StorageError on every rank.

Loading never unpickles arbitrary code: tensors and the extra files go through
`torch.load(weights_only=True)`, and DCP's `.metadata` (a pickle) is read with an unpickler
that only admits DCP's own metadata classes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from packtune import manifest
from packtune.errors import CheckpointError, StorageError
from packtune.parallel import DistContext
from packtune.storage import os_error_behind, storage_error

_STEP_DIR = re.compile(r"^step_(\d{8})$")

# (module, name) pairs DCP's metadata pickle may reference; anything else is refused.
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}
_METADATA_MODULES = ("torch.distributed.checkpoint.",)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module, name) in _METADATA_GLOBALS
            or module.startswith(_METADATA_MODULES)
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise CheckpointError(f"checkpoint metadata references {module}.{name}, which is not allowed")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with the `.metadata` pickle restricted to DCP's own classes."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories (complete or damaged: `verify` tells), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files match its manifest (sizes; contents are read at resume)."""
    for path in reversed(list_checkpoints(output_dir)):
        if manifest.verify(path, part=None) is None:
            return path
    return None


def newest_verified(output_dir: str | Path, dist_ctx: DistContext) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies against its manifest (the ranks share the reading), and
    one line for each newer checkpoint skipped, naming the reason. Collective."""
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path, dist_ctx)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


def verify_checkpoint(path: Path, dist_ctx: DistContext) -> str | None:
    """`manifest.verify` with the contents read by all ranks, a share each; the same answer on all."""
    mine = manifest.verify(path, part=(dist_ctx.rank, dist_ctx.world_size))
    problems = [p for texts in dist_ctx.all_gather_texts([mine or ""]) for p in texts if p]
    return problems[0] if problems else None


def check_checkpoints(path: str | Path) -> tuple[list[str], bool]:
    """`packtune check-checkpoint`: verify every checkpoint under `path` (a run's output_dir, its
    checkpoints/ folder, or one checkpoint) without loading it: one line each, newest first, and
    whether all verify."""
    path = Path(path)
    if _STEP_DIR.match(path.name.removesuffix(".tmp")) and path.is_dir():
        found = [path]
    else:
        found = list(reversed(list_checkpoints(path if path.name != "checkpoints" else path.parent)))
    if not found:
        raise CheckpointError(f"{path}: no checkpoints (expected a run's output_dir, its checkpoints/ folder "
                              "or a step_XXXXXXXX directory)")
    lines, ok, resumable = [], True, None
    for checkpoint in found:
        problem = manifest.verify(checkpoint)
        if problem is None:
            resumable = resumable or checkpoint
            lines.append(f"{checkpoint}: ok ({manifest.describe(checkpoint)})")
        else:
            ok = False
            lines.append(f"{checkpoint}: DAMAGED: {problem}")
    if not ok and len(found) > 1:
        lines.append(f"a resume would use {resumable.name}" if resumable is not None
                     else "no checkpoint verifies: a resume would stop with an error, deleting nothing")
    return lines, ok


def _state_options(model: nn.Module) -> StateDictOptions:
    """Frozen parameters (a LoRA run's base) are not saved: they are reloaded from the base model."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=not frozen)


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """DCP gets only tensors; the optimizer's hyper-parameters travel in the extra file."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options(model))
    # ignore_frozen_params misses a second name of a shared frozen weight (a tied lm_head)
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    model_sd = {name: t for name, t in model_sd.items() if name not in frozen}
    as_list = lambda v: list(v) if isinstance(v, tuple) else v
    groups = [{k: as_list(v) for k, v in group.items()} for group in optim_sd["param_groups"]]
    return {"model": model_sd, "optim": {"state": optim_sd["state"]}}, groups


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    dist_ctx: DistContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write step `step` (collective: every rank calls it) with its manifest, then keep the newest
    `keep` verified checkpoints (0: all).

    Any rank's OSError (a full disk, no permission, an I/O error) raises StorageError on every
    rank, after the partial `.tmp` directory is removed; the checkpoints already there are untouched."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    previous = latest_checkpoint(output_dir)
    after = (f"the previous checkpoint {previous.name} is intact" if previous is not None
             else "no earlier checkpoint exists")
    action = f"cannot save checkpoint {final.name}"

    def prepare() -> None:
        for stale in [*root.glob("step_*.tmp"), *root.glob("step_*.old")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)

    _on_every_rank(dist_ctx, prepare if dist_ctx.is_main else None, action, root, after)

    def write() -> dict[str, dict[str, Any]]:
        tensors, groups = _tensor_state(model, optimizer)
        with _single_process_quiet(dist_ctx):
            dcp.save(tensors, checkpoint_id=tmp, no_dist=dist_ctx.mesh is None)
        state = {**extra, "step": step, "param_groups": groups, "rng": _rng_state(dist_ctx)}
        _save_synced(state, tmp / f"extra_rank{dist_ctx.rank}.pt")
        names = sorted(p.name for p in tmp.iterdir())
        return {name: manifest.file_entry(tmp / name) for name in manifest.rank_files(names, dist_ctx.rank)}

    try:
        entries = _on_every_rank(dist_ctx, write, action, root, after)
    except StorageError:
        if dist_ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist_ctx.barrier()
        raise
    gathered = dist_ctx.all_gather_texts([json.dumps(entries)])

    def publish() -> None:
        files = {}
        for texts in gathered:
            files.update(json.loads(texts[0]))
        for name in sorted(p.name for p in tmp.iterdir() if p.name not in files):
            files[name] = manifest.file_entry(tmp / name)  # a file of DCP's no rank claimed
        manifest.write_manifest(tmp, step, dist_ctx.world_size, files)
        _replace(tmp, final)
        if keep > 0:
            verified = [p for p in list_checkpoints(output_dir) if manifest.verify(p, part=None) is None]
            for old in verified[:-keep]:  # the newest, just written and verified, is never among them
                shutil.rmtree(old, ignore_errors=True)

    try:
        _on_every_rank(dist_ctx, publish if dist_ctx.is_main else None, action, root, after)
    except StorageError:
        if dist_ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _on_every_rank(dist_ctx: DistContext, fn: Callable[[], Any] | None, action: str, where: Path,
                   after: str) -> Any:
    """Run `fn` on this rank (None: nothing), then agree: if any rank failed to write (packtune.storage
    tells a storage failure from a bug), every rank raises the same StorageError, the lowest failing
    rank's. Returns `fn`'s result."""
    result, kind, failure, bug = None, "", "", None
    try:
        result = fn() if fn is not None else None
    except (Exception, CheckpointException) as e:
        error = os_error_behind(e, _existing(where))
        if error is None:  # not storage: a bug, raised as it is here, named on the other ranks
            bug, kind, failure = e, "bug", f"{action}: rank {dist_ctx.rank} failed ({type(e).__name__}: {e})"
        else:
            kind, failure = "storage", str(storage_error(action, where, error, after))
    failures = [texts for texts in dist_ctx.all_gather_texts([kind, failure]) if texts[0]]
    if bug is not None:
        raise bug
    if failures:
        kind, failure = failures[0]
        raise (StorageError if kind == "storage" else CheckpointError)(failure)
    return result


def _existing(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _save_synced(state: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _replace(tmp: Path, final: Path) -> None:
    """Give `tmp` the name `final`; an existing `final` (the same step saved again, or a damaged copy)
    is moved away first and deleted only after the new one is in place."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if old.exists():
            old.rename(final)
        raise
    manifest.fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: str | Path, dist_ctx: DistContext, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model and optimizer in place (resharding if the world size changed); returns
    this rank's extra state (step, scheduler, sampler, ...), RNG already restored."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no .metadata file)")
    extra_file = path / f"extra_rank{dist_ctx.rank}.pt"
    if not extra_file.exists():
        extra_file = path / "extra_rank0.pt"  # resumed with more ranks than saved it
    try:
        extra = torch.load(extra_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {extra_file.name}") from None
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # refuse a tampered metadata pickle here, with a readable error
    tensors, _ = _tensor_state(model, optimizer)
    with _single_process_quiet(dist_ctx):
        dcp.load(tensors, storage_reader=reader, no_dist=dist_ctx.mesh is None)
    optim_sd = {"state": tensors["optim"]["state"], "param_groups": extra["param_groups"]}
    set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=optim_sd,
                   options=_state_options(model))
    _set_rng_state(extra["rng"], dist_ctx)
    return extra


@contextlib.contextmanager
def _single_process_quiet(dist_ctx: DistContext) -> Iterator[None]:
    """DCP warns that it 'assumes' a single process when there is no process group; we know."""
    with warnings.catch_warnings():
        if dist_ctx.mesh is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state(dist_ctx: DistContext) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if dist_ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dist_ctx.device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], dist_ctx: DistContext) -> None:
    torch.set_rng_state(state["cpu"])
    if dist_ctx.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dist_ctx.device)
