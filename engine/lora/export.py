"""A LoRA run's outputs: the PEFT adapter (`final/`) and/or the merged model (`final-merged/`), and
`packtune merge BASE ADAPTER OUT` which merges afterwards.

Merging computes W + scale * B A in fp32 per linear and writes a plain Hugging Face model
directory (the LoRA tensors dropped), in the export dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from packtune.kernels.lora import dense_weight
from packtune.lora.apply import LoRASpec, lora_modules
from packtune.lora.peft_format import adapter_tensors, save_adapter

EXPORT_MODES = ("adapter", "merged", "both")


def export_mode(value: bool | str) -> str | None:
    """`train.export` for a LoRA run: true -> adapter, false -> None, else the named mode."""
    if value is True:
        return "adapter"
    if value is False:
        return None
    return value


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (full tensors by the model's names) with every LoRA linear's W replaced by W + s B A
    and the adapter tensors removed."""
    merged = {name: t for name, t in state.items() if not name.endswith((".lora_A", ".lora_B"))}
    for name, module in lora_modules(model).items():
        w = dense_weight(state[f"{name}.weight"], torch.float32)
        a, b = state[f"{name}.lora_A"].float(), state[f"{name}.lora_B"].float()
        merged[f"{name}.weight"] = w + module.scale * (b @ a)
    return merged


def export_lora(model: nn.Module, spec: LoRASpec, state: dict[str, torch.Tensor], output_dir: Path,
                mode: str, base_model: str, write_model: Callable[[dict[str, torch.Tensor], Path], None]
                ) -> Path:
    """Write the adapter to `final/` and/or the merged model to `final-merged/` (via `write_model`,
    which saves a Hugging Face directory with the tokenizer); returns the first path written."""
    written = []
    if mode in ("adapter", "both"):
        written.append(save_adapter(output_dir / "final", spec, adapter_tensors(model, state), base_model))
    if mode in ("merged", "both"):
        path = output_dir / "final-merged"
        write_model(merged_state_dict(model, state), path)
        written.append(path)
    return written[0]


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                  dtype: torch.dtype | None = None) -> Path:
    """`packtune merge`: base model directory + PEFT adapter -> merged Hugging Face model directory."""
    from packtune.lora.peft_format import load_adapter_into
    from packtune.model.hf_io import load_pretrained, save_pretrained, stored_dtype

    model = load_pretrained(base, dtype=torch.float32)
    load_adapter_into(model, adapter)
    state = merged_state_dict(model, model.state_dict())
    return save_pretrained(model, out, state_dict=state, dtype=dtype or stored_dtype(base))
