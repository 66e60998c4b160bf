"""`packtune bench lora-memory`: the frozen base's memory under LoRA (fp32, bf16) and QLoRA (NF4),
and the trainable share, for a Llama-7B-shaped model with fewer layers (`--layers`) and
optionally narrower (`--scale`). Weights are random: only their storage is measured."""

from __future__ import annotations

import argparse

import torch

from packtune.lora.apply import LoRASpec, apply_lora, base_bytes, lora_modules, parameter_counts
from packtune.model.config import ModelArgs
from packtune.model.llama import LlamaForCausalLM


def _model(layers: int, scale: int) -> LlamaForCausalLM:
    args = ModelArgs(vocab_size=32000, hidden_size=4096 // scale, intermediate_size=11008 // scale,
                     num_hidden_layers=layers, num_attention_heads=32 // scale,
                     num_key_value_heads=32 // scale, head_dim=128)
    model = LlamaForCausalLM(args)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="packtune bench lora-memory", description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--scale", type=int, default=1, help="divide Llama-7B's widths")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    spec = LoRASpec(args.rank, 2.0 * args.rank)
    print(f"packtune bench lora-memory: Llama-7B shapes / {args.scale}, {args.layers} layers, "
          f"rank {args.rank}, all-linear")
    print(f"{'base storage':<14}{'linears MiB':>13}{'all frozen MiB':>16}{'vs bf16':>9}  trainable of total")
    linear_bf16 = None
    for storage in (torch.bfloat16, torch.float32, "nf4"):
        model = _model(args.layers, args.scale)
        apply_lora(model, spec, storage, nf4_others=torch.bfloat16)  # QLoRA's other weights as on a GPU
        linears = sum(base_bytes(m) for m in lora_modules(model).values())
        linear_bf16 = linears if storage == torch.bfloat16 else linear_bf16
        trainable, total = parameter_counts(model)
        name = storage if isinstance(storage, str) else str(storage).removeprefix("torch.")
        ratio = f"{linears / linear_bf16:.3f}" if linear_bf16 else "-"
        print(f"{name:<14}{linears / 2**20:>13.1f}{base_bytes(model) / 2**20:>16.1f}{ratio:>9}"
              f"  {trainable:,} of {total:,}")
