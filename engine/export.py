"""The run's export stage: the trained weights gathered on rank 0 and written as a Hugging Face model
directory `<output_dir>/final` with the run's tokenizer files; a LoRA run writes the PEFT adapter
(`final/`) and/or the merged model (`final-merged/`), as `train.export` says.

Each directory is written under a temporary name and renamed when complete, so `final/` is whole or
absent. An export that fails for want of storage (packtune.storage) raises StorageError with one
line; the run stays unfinished, and the same command exports again from its last checkpoint."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from packtune.checkpoint import latest_checkpoint
from packtune.config import Config
from packtune.storage import os_error_behind, storage_error


def export_dtype(cfg: Config, model: nn.Module) -> torch.dtype | None:
    """The export keeps the model's dtype: `model.dtype` when named, else the dtype the source
    checkpoint was stored in (None: the parameters' own)."""
    from packtune.model.hf_io import stored_dtype

    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    source = getattr(model, "source_dir", None)
    return stored_dtype(source) if source is not None else None


def export_model(trainer, cfg: Config) -> Path | None:
    """Write the trained model (rank 0; every rank takes part in the gather); returns the first
    directory written, None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from packtune.lora.sharded_nf4 import gather_full_state, nf4_weights

    if nf4_weights(trainer.module):  # QLoRA: torch's gather cannot all-gather NF4 shards
        state = gather_full_state(trainer.module, keep=trainer.dist_ctx.is_main)
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(trainer.module, options=options)
    if not trainer.dist_ctx.is_main:
        return None
    state = {name.removeprefix("model."): tensor for name, tensor in state.items()}
    output_dir = Path(cfg.train.output_dir)
    try:
        return _write(trainer, state, output_dir, cfg)
    except Exception as e:
        error = os_error_behind(e, output_dir)
        if error is None:
            raise
        latest = latest_checkpoint(output_dir)
        if latest is not None:
            after = (f"the run's last checkpoint {latest.name} is kept: the same command again resumes "
                     "from it and exports")
        else:
            after = ("no checkpoint holds the trained weights (train.save_every = 0): train again once "
                     "there is room")
        raise storage_error("cannot export the model", output_dir, error, after) from None


def _write(trainer, state: dict[str, torch.Tensor], output_dir: Path, cfg: Config) -> Path:
    if not cfg.lora.enabled:
        write_model(trainer.model, state, output_dir / "final", cfg)
        return output_dir / "final"
    from packtune.lora.apply import LoRASpec
    from packtune.lora.export import merged_state_dict
    from packtune.lora.peft_format import adapter_tensors, save_adapter

    mode = "adapter" if cfg.train.export is True else cfg.train.export
    written = []
    if mode in ("adapter", "both"):
        from packtune.model.families import family_for

        spec = LoRASpec.from_config(cfg.lora)
        base = str(Path(cfg.model.path).resolve())
        task = family_for(trainer.model.args.model_type).peft_task_type
        written.append(save_adapter(output_dir / "final", spec, adapter_tensors(trainer.model, state), base,
                                    task_type=task))
    if mode in ("merged", "both"):
        write_model(trainer.model, merged_state_dict(trainer.model, state), output_dir / "final-merged", cfg)
        written.append(output_dir / "final-merged")
    return written[0]


def write_model(model: nn.Module, state: dict[str, torch.Tensor], path: Path, cfg: Config) -> None:
    """A Hugging Face model directory with the run's tokenizer files (written atomically, together)."""
    from packtune.model.hf_io import save_pretrained

    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    files = sorted(tokenizer.glob("tokenizer*")) if tokenizer and tokenizer.is_dir() else []
    with tempfile.TemporaryDirectory() as staging:
        if tokenizer is not None and tokenizer.is_file():  # under the name loaders look for
            name = "tokenizer.json" if tokenizer.suffix == ".json" else "tokenizer.model"
            files = [Path(shutil.copyfile(tokenizer, Path(staging) / name))]
        save_pretrained(model, path, tokenizer_files=files, state_dict=state, dtype=export_dtype(cfg, model))
