"""Merging LoRA adapters into their base: what a LoRA run's `final-merged/` holds (engine/export.py),
and `packtune merge BASE ADAPTER OUT`, which merges afterwards.

Merging computes W + scale * B A in fp32 per linear and writes a plain Hugging Face model
directory (the LoRA tensors dropped), in the export dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from packtune.kernels.lora import dense_weight
from packtune.lora.apply import lora_modules


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (full tensors by the model's names) with every LoRA linear's W replaced by W + s B A
    and the adapter tensors removed."""
    from packtune.lora.experts import lora_experts

    merged = {name: t for name, t in state.items() if not name.endswith((".lora_A", ".lora_B"))}
    for name, module in lora_modules(model).items():
        w = dense_weight(state[f"{name}.weight"], torch.float32)
        a, b = state[f"{name}.lora_A"].float(), state[f"{name}.lora_B"].float()
        merged[f"{name}.weight"] = w + module.scale * (b @ a)
    for name, experts in lora_experts(model).items():  # W + scale B_e A_e per expert
        for weight, adapter in experts.adapters.items():
            lora = f"{name}.adapters.{weight}"
            update = adapter.delta(state[f"{lora}.lora_A"].float(), state[f"{lora}.lora_B"].float())
            base = dense_weight(state[f"{name}.{weight}"], torch.float32).view(adapter.shape)  # NF4: 2-D
            merged[f"{name}.{weight}"] = base + update
    return merged


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                  dtype: torch.dtype | None = None) -> Path:
    """`packtune merge`: base model directory + PEFT adapter -> merged Hugging Face model directory."""
    from packtune.lora.peft_format import load_adapter_into
    from packtune.model.hf_io import load_pretrained, save_pretrained, stored_dtype

    model = load_pretrained(base, dtype=torch.float32)
    load_adapter_into(model, adapter)
    state = merged_state_dict(model, model.state_dict())
    return save_pretrained(model, out, state_dict=state, dtype=dtype or stored_dtype(base))
