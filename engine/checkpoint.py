"""Resumable training checkpoints with PyTorch distributed checkpoint (DCP).

Layout: `<output_dir>/checkpoints/step_00000120/` holds the DCP files (the trainable model and
optimizer tensors, each rank writing its own shards, reshardable on load; a LoRA run's frozen
base is not saved) plus `extra_rank<r>.pt` (per-rank plain state: step, scheduler, sampler
rows dealt, RNG, optimizer hyper-parameters).
A checkpoint is written into `step_XXXXXXXX.tmp` and renamed once every rank has finished, so
a directory without the suffix is always complete; a run killed mid-write leaves only a
`.tmp` directory, which `latest_checkpoint` ignores and the next save deletes.

Loading never unpickles arbitrary code: tensors and the extra files go through
`torch.load(weights_only=True)`, and DCP's `.metadata` (a pickle) is read with an unpickler
that only admits DCP's own metadata classes.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from packtune.errors import CheckpointError
from packtune.parallel import DistContext

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
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / ".metadata").exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


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
    """Write step `step` (collective: every rank calls it), then keep only the newest `keep`."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if dist_ctx.is_main:
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # saving the same step again (e.g. SIGTERM right after a save)
            shutil.rmtree(final)
        tmp.mkdir(parents=True)
    dist_ctx.barrier()
    tensors, groups = _tensor_state(model, optimizer)
    with _single_process_quiet(dist_ctx):
        dcp.save(tensors, checkpoint_id=tmp, no_dist=dist_ctx.mesh is None)
    state = {**extra, "step": step, "param_groups": groups, "rng": _rng_state(dist_ctx)}
    torch.save(state, tmp / f"extra_rank{dist_ctx.rank}.pt")
    dist_ctx.barrier()
    if dist_ctx.is_main:
        tmp.rename(final)
        if keep > 0:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist_ctx.barrier()
    return final


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
