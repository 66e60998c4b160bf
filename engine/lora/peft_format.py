"""PEFT's adapter directory, read and written without PEFT: `adapter_config.json` (a LoraConfig) and
`adapter_model.safetensors` with PEFT's tensor names.

packtune's `model.layers.0.self_attn.q_proj.lora_A` is PEFT's
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`: the LoraModel and
PeftModel prefixes in front, the adapter's Linear submodule's `weight` behind. The directory is
written into a temporary sibling and renamed into place, like a model export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from packtune.errors import CheckpointError, ConfigError
from packtune.lora.apply import LoRASpec, lora_modules
from packtune.model.families import lora_target_names
from packtune.model.hf_io import _fsync, _new_dir, _replace_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_key(name: str) -> str:
    """`model.layers.0.mlp.up_proj.lora_B` -> `base_model.model.model.layers.0.mlp.up_proj.lora_B.weight`."""
    return f"{PEFT_PREFIX}{name}.weight"


def packtune_key(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX).removesuffix(".weight")


def adapted_projections(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The projection names an adapter's tensors adapt (`...q_proj.lora_A` -> q_proj), sorted:
    the `target_modules` PEFT writes for them, whatever the config asked (PEFT's may be full module
    names, a regex or "all-linear")."""
    return sorted({packtune_key(name).rsplit(".", 2)[-2] for name in tensors})


def adapter_config(spec: LoRASpec, targets: list[str], base_model: str = "", task_type: str = "CAUSAL_LM"
                   ) -> dict:
    """PEFT's LoraConfig fields for these adapters (the defaults PEFT writes for the others);
    `task_type` is the family's (`Family.peft_task_type`: SEQ_2_SEQ_LM for T5)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
        "peft_version": "packtune",
    }


def adapter_tensors(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's names, from `state_dict` (full tensors, names without a wrapper
    prefix) or the model's own parameters."""
    if state_dict is None:
        state_dict = _adapter_params(model)
    return {peft_key(name): t.detach().to("cpu").contiguous()
            for name, t in state_dict.items() if name.endswith((".lora_A", ".lora_B"))}


def _adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{p}": getattr(m, p) for n, m in lora_modules(model).items() for p in ("lora_A", "lora_B")}


def save_adapter(path: str | os.PathLike, spec: LoRASpec, tensors: dict[str, torch.Tensor],
                 base_model: str = "", dtype: torch.dtype | None = None, task_type: str = "CAUSAL_LM"
                 ) -> Path:
    """Write a PEFT adapter directory atomically (an existing one is replaced, anything else refused)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / CONFIG_NAME).is_file())):
        raise CheckpointError(f"{path}: exists and is not an adapter directory; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(path.parent, f".{path.name}.", ".tmp")
    try:
        data = {k: v.to(dtype) if dtype is not None else v for k, v in tensors.items()}
        save_file(data, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        config = adapter_config(spec, adapted_projections(tensors), base_model, task_type)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
            _fsync(file)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_adapter(path: str | os.PathLike) -> tuple[LoRASpec, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter directory as (spec, tensors by packtune name); unsupported options refused."""
    path = Path(path)
    config_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights.is_file():
        raise ConfigError(f"{path}: not a PEFT adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: a {config.get('peft_type')} adapter; only LoRA adapters load")
    for key, plain in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"),
                       ("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None)):
        if config.get(key, plain) not in (plain, None, [], {}):
            raise ConfigError(f"{path}: {key} = {config[key]!r} is not supported (only {plain!r})")
    peft_tensors = load_file(weights)
    targets = adapted_projections(peft_tensors)
    unknown = sorted(set(targets) - set(lora_target_names()))
    if unknown or not targets:
        raise ConfigError(f"{path}: adapts {unknown or 'nothing'}; packtune adapts the decoder blocks' "
                          f"projections ({', '.join(lora_target_names())})")
    spec = LoRASpec(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0),
                    tuple(targets), bool(config.get("use_rslora", False)))
    return spec, {packtune_key(k): v for k, v in peft_tensors.items()}


@torch.no_grad()
def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor],
                         source: str | os.PathLike) -> None:
    """Copy adapter tensors (packtune names) into the model's LoRA modules; every adapter must be given."""
    params = _adapter_params(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    misshapen = [n for n in set(params) & set(tensors) if params[n].shape != tensors[n].shape]
    if missing or unexpected or misshapen:
        raise CheckpointError(f"{source}: adapter does not match the model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}, wrong shape {sorted(misshapen)[:4]}")
    for name, param in params.items():
        param.copy_(tensors[name])


def load_adapter_into(model: nn.Module, adapter: str | os.PathLike,
                      storage: torch.dtype | str | None = None) -> LoRASpec:
    """Add the adapter directory's LoRA modules to a plain packtune model and load its weights."""
    from packtune.lora.apply import apply_lora

    spec, tensors = read_adapter(adapter)
    apply_lora(model, spec, storage)
    load_adapter_weights(model, tensors, adapter)
    return spec
