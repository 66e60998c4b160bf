"""PEFT's adapter directory, read and written without PEFT: `adapter_config.json` (a LoraConfig) and
`adapter_model.safetensors` with PEFT's tensor names.

packtune's `model.layers.0.self_attn.q_proj.lora_A` is PEFT's
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`: the LoraModel and
PeftModel prefixes in front, the adapter's Linear submodule's `weight` behind. Adapters on expert
weights (packtune's `...mlp.experts.adapters.gate_up_proj.lora_A`, packtune.lora.experts) are PEFT's
`target_parameters`, whose wrappers nest around the experts module in the order it declares its
weights: with both adapted, gate_up_proj's is `...mlp.experts.base_layer.lora_A.weight` and
down_proj's `...mlp.experts.lora_A.weight`. The directory is written into a temporary sibling and
renamed into place, like a model export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from packtune.errors import CheckpointError, ConfigError
from packtune.lora.apply import LoRASpec, lora_modules
from packtune.lora.experts import EXPERT_WEIGHTS, lora_experts
from packtune.model.families import lora_target_names
from packtune.model.hf_io import _fsync, _new_dir, _replace_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


_EXPERT_ADAPTER = re.compile(r"^(?P<module>.+)\.adapters\.(?P<weight>\w+)\.(?P<part>lora_[AB])$")
_PEFT_EXPERT_ADAPTER = re.compile(
    r"^(?P<module>.+\.experts)(?P<nesting>(\.base_layer)*)\.(?P<part>lora_[AB])$")


def peft_key(name: str) -> str:
    """`model.layers.0.mlp.up_proj.lora_B` -> `base_model.model.model.layers.0.mlp.up_proj.lora_B.weight`."""
    return f"{PEFT_PREFIX}{name}.weight"


def packtune_key(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX).removesuffix(".weight")


def peft_names(names: Iterable[str]) -> dict[str, str]:
    """packtune adapter tensor name -> PEFT's, for all the adapters of one model (an expert weight's
    adapter nests inside those of the weights its module declares after it)."""
    names = list(names)
    adapted: dict[str, set[str]] = defaultdict(set)
    for name in names:
        if match := _EXPERT_ADAPTER.match(name):
            adapted[match["module"]].add(match["weight"])
    keys = {}
    for name in names:
        match = _EXPERT_ADAPTER.match(name)
        if match is None:
            keys[name] = peft_key(name)
            continue
        order = [weight for weight in EXPERT_WEIGHTS if weight in adapted[match["module"]]]
        depth = len(order) - 1 - order.index(match["weight"])
        keys[name] = f"{PEFT_PREFIX}{match['module']}{'.base_layer' * depth}.{match['part']}.weight"
    return keys


def packtune_names(keys: Iterable[str], expert_weights: tuple[str, ...]) -> dict[str, str]:
    """PEFT adapter tensor key -> packtune's; `expert_weights`: the expert weights the adapter's
    `target_parameters` name, in declaration order (the innermost wrapper's first)."""
    names = {}
    for key in keys:
        name = packtune_key(key)
        match = _PEFT_EXPERT_ADAPTER.match(name)
        if match and expert_weights:
            depth = match["nesting"].count(".base_layer")
            if depth >= len(expert_weights):
                raise ConfigError(f"adapter tensor {key} is nested deeper than its {len(expert_weights)} "
                                  "target_parameters")
            weight = expert_weights[len(expert_weights) - 1 - depth]
            name = f"{match['module']}.adapters.{weight}.{match['part']}"
        names[key] = name
    return names


def adapted_projections(tensors: Iterable[str]) -> list[str]:
    """The projection names adapter tensors (packtune names) adapt (`...q_proj.lora_A` -> q_proj,
    `...experts.adapters.down_proj.lora_B` -> experts.down_proj), sorted: the targets PEFT's config
    gets, whatever the run's config asked (it may say "all-linear")."""
    targets = set()
    for name in tensors:
        match = _EXPERT_ADAPTER.match(name)
        targets.add(f"experts.{match['weight']}" if match else name.rsplit(".", 2)[-2])
    return sorted(targets)


def adapter_config(spec: LoRASpec, targets: list[str], base_model: str = "", task_type: str = "CAUSAL_LM"
                   ) -> dict:
    """PEFT's LoraConfig fields for these adapters (the defaults PEFT writes for the others); the
    expert weights among `targets` are its `target_parameters`; `task_type` is the family's
    (`Family.peft_task_type`: SEQ_2_SEQ_LM for T5)."""
    parameters = [t for t in targets if t.startswith("experts.")]
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": [t for t in targets if t not in parameters],
        "target_parameters": parameters or None,
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
    """The adapters by their packtune names (save_adapter writes them under PEFT's), from `state_dict`
    (full tensors, names without a wrapper prefix) or the model's own parameters."""
    if state_dict is None:
        state_dict = _adapter_params(model)
    return {name: t.detach().to("cpu").contiguous()
            for name, t in state_dict.items() if name.endswith((".lora_A", ".lora_B"))}


def _adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    params = {f"{n}.{p}": getattr(m, p) for n, m in lora_modules(model).items() for p in ("lora_A", "lora_B")}
    for n, experts in lora_experts(model).items():
        for weight, adapter in experts.adapters.items():
            params.update({f"{n}.adapters.{weight}.{p}": getattr(adapter, p) for p in ("lora_A", "lora_B")})
    return params


def save_adapter(path: str | os.PathLike, spec: LoRASpec, tensors: dict[str, torch.Tensor],
                 base_model: str = "", dtype: torch.dtype | None = None, task_type: str = "CAUSAL_LM"
                 ) -> Path:
    """Write a PEFT adapter directory atomically (an existing one is replaced, anything else refused);
    `tensors` by packtune names (`adapter_tensors`)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / CONFIG_NAME).is_file())):
        raise CheckpointError(f"{path}: exists and is not an adapter directory; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(path.parent, f".{path.name}.", ".tmp")
    try:
        keys = peft_names(tensors)
        data = {keys[k]: v.to(dtype) if dtype is not None else v for k, v in tensors.items()}
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
    expert_weights = _expert_weights(path, config.get("target_parameters") or [])
    for key, plain in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"),
                       ("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None)):
        if config.get(key, plain) not in (plain, None, [], {}):
            raise ConfigError(f"{path}: {key} = {config[key]!r} is not supported (only {plain!r})")
    peft_tensors = load_file(weights)
    names = packtune_names(peft_tensors, expert_weights)
    targets = adapted_projections(names.values())
    unknown = sorted(set(targets) - set(lora_target_names()))
    if unknown or not targets:
        raise ConfigError(f"{path}: adapts {unknown or 'nothing'}; packtune adapts the decoder blocks' "
                          f"projections ({', '.join(lora_target_names())})")
    spec = LoRASpec(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0),
                    tuple(targets), bool(config.get("use_rslora", False)))
    return spec, {names[k]: v for k, v in peft_tensors.items()}


def _expert_weights(path: Path, target_parameters: list[str]) -> tuple[str, ...]:
    """The expert weights a PEFT config's `target_parameters` adapt, in declaration order; any other
    parameter is refused by name."""
    found = set()
    for target in target_parameters:
        weight = target.rsplit(".", 1)[-1]
        if weight not in EXPERT_WEIGHTS or target not in (weight, f"experts.{weight}") and \
                not target.endswith(f".experts.{weight}"):
            raise ConfigError(f"{path}: target_parameters names {target!r}; packtune adapts the experts' "
                              f"weights only ({', '.join(f'experts.{w}' for w in EXPERT_WEIGHTS)})")
        found.add(weight)
    return tuple(weight for weight in EXPERT_WEIGHTS if weight in found)


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
