"""LoRA in `packtune train`: check [lora], add the adapters to the model being trained, say what trains.

One process: the loaded model gets its adapters at once (A from a generator seeded by
`train.seed`, or the weights of `lora.init_from`). Sharded: the meta model gets meta adapters,
and rank 0 builds the same adapters on its full copy, whose state it broadcasts, so every world
size starts from identical adapters. Sharded QLoRA: the meta model holds meta NF4 weights (FSDP
shards them), rank 0's copy dense ones, which `packtune.lora.sharded_nf4` broadcasts and
quantises on every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from packtune.config import Config, LoRAConfig
from packtune.errors import ConfigError
from packtune.lora.apply import LoRASpec, apply_lora, base_dtype, describe


def check_init_from(cfg: LoRAConfig) -> None:
    """`lora.init_from`'s adapter has this run's rank, alpha and scaling (its targets are checked
    against the model when the adapters are added)."""
    from packtune.lora.peft_format import read_adapter

    adapter, _ = read_adapter(cfg.init_from)
    ours = LoRASpec.from_config(cfg)
    for key in ("rank", "alpha", "rslora"):
        if getattr(adapter, key) != getattr(ours, key):
            raise ConfigError(f"lora.init_from: the adapter in {cfg.init_from} has {key} = "
                              f"{getattr(adapter, key)!r} but [lora] says {getattr(ours, key)!r}; "
                              f"set lora.{key} to match it")


def lora_preparer(cfg: Config, device: torch.device, sharded: bool):
    """The function that adds this run's adapters to a model (None for full fine-tuning)."""
    if not cfg.lora.enabled:
        return None
    spec = LoRASpec.from_config(cfg.lora)
    storage = base_dtype(cfg.lora.base_dtype, device)

    def prepare(model: nn.Module) -> nn.Module:
        on_meta = any(p.is_meta for p in model.parameters())
        generator = torch.Generator().manual_seed(cfg.train.seed)
        if cfg.lora.init_from:
            from packtune.lora.peft_format import load_adapter_weights, read_adapter

            adapter, tensors = read_adapter(cfg.lora.init_from)
            ours = spec.for_model(model).targets
            if set(adapter.targets) != set(ours):
                raise ConfigError(f"lora.init_from: the adapter in {cfg.lora.init_from} adapts "
                                  f"{', '.join(adapter.targets)} but [lora] targets {', '.join(ours)} of "
                                  f"this model; set lora.targets = {list(adapter.targets)}")
        # Sharded QLoRA: rank 0's full copy keeps the NF4 weights dense (in the dtype of the other
        # frozen weights) to broadcast them; every rank quantises them itself (packtune.lora.sharded_nf4).
        dense_copy = storage == "nf4" and sharded and not on_meta
        others = base_dtype("auto", device)
        apply_lora(model, spec, others if dense_copy else storage, generator, nf4_others=others)
        if storage == "nf4" and sharded and on_meta:
            from packtune.lora.sharded_nf4 import check_nf4_shardable

            check_nf4_shardable(model, torch.distributed.get_world_size())
        if cfg.lora.init_from and not on_meta:
            load_adapter_weights(model, tensors, Path(cfg.lora.init_from))
        return model

    return prepare


def lora_summary(cfg: Config, model: nn.Module, device: torch.device, whole_base: int | None = None,
                 world_size: int = 1) -> str:
    """The run's lora line (see `describe`; sharded: `model` holds this rank's shards)."""
    spec = LoRASpec.from_config(cfg.lora)
    line = describe(model, spec, base_dtype(cfg.lora.base_dtype, device), whole_base, world_size)
    return line + (f"; adapters from {cfg.lora.init_from}" if cfg.lora.init_from else "")
