"""LoRA and QLoRA: adapters on a frozen base, fused kernels, PEFT-compatible adapter files."""

from packtune.lora.apply import LoRASpec, apply_lora, is_lora_model, lora_modules, parameter_counts
from packtune.lora.export import merge_adapter, merged_state_dict
from packtune.lora.modules import LoRALinear, LoRAMLP
from packtune.lora.peft_format import load_adapter_into, read_adapter, save_adapter

__all__ = [
    "LoRALinear",
    "LoRAMLP",
    "LoRASpec",
    "apply_lora",
    "is_lora_model",
    "load_adapter_into",
    "lora_modules",
    "merge_adapter",
    "merged_state_dict",
    "parameter_counts",
    "read_adapter",
    "save_adapter",
]
