"""Turn a packtune model into a LoRA model: freeze it, swap the targeted linears for LoRALinear.

The blocks' linears (every list of `model.block_lists`: a decoder's layers, T5's encoder and decoder
blocks) are replaced in place, under the family's own names (Llama's `self_attn.q_proj` ...
`mlp.down_proj`, Phi-3's fused `qkv_proj` / `gate_up_proj`, BLOOM's `query_key_value` / `dense` /
`dense_h_to_4h` / `dense_4h_to_h`, T5's `q` / `k` / `v` / `o` / `wi_0` / `wi_1` / `wo`), as PEFT
names them; a layer whose gate, up and down projections are all targeted gets a `LoRAMLP` (the fused
kernel) in place of its MLP. Every base parameter is frozen (embeddings, norms and lm_head too) and
stored in the base dtype (bf16, fp32 or NF4); only `lora_A` / `lora_B` train, in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from packtune.config import LoRAConfig
from packtune.config.lora import ALL_LINEAR
from packtune.errors import ConfigError
from packtune.kernels import geglu
from packtune.kernels.nf4_matmul import is_nf4
from packtune.lora.modules import LoRALinear, LoRAMLP
from packtune.precision import compute_dtype

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRASpec:
    """What adapters to add: rank, scaling, dropout and the targeted projection names (or
    ALL_LINEAR, which `for_model` turns into the model's own names)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ALL_LINEAR
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_config(cls, cfg: LoRAConfig) -> LoRASpec:
        cfg.check()
        return cls(cfg.rank, cfg.alpha, cfg.dropout, cfg.resolved_targets(), cfg.rslora)

    def for_model(self, model: nn.Module) -> LoRASpec:
        """This spec with its targets named as `model`'s blocks name them, in block order; a target
        the model's blocks lack is a ConfigError that names the model type and its linears."""
        linears = block_linears(model)
        if self.targets == ALL_LINEAR:
            return replace(self, targets=linears)
        missing = [name for name in self.targets if name not in linears]
        if missing:
            kind = getattr(getattr(model, "args", None), "model_type", type(model).__name__)
            raise ConfigError(f"lora.targets: {kind} blocks have no {', '.join(missing)} projection "
                              f"(their linears: {', '.join(linears)}); name those, or use \"{ALL_LINEAR}\"")
        return replace(self, targets=tuple(name for name in linears if name in self.targets))


def block_linears(model: nn.Module) -> tuple[str, ...]:
    """The leaf names of the blocks' linears, and `experts.gate_up_proj` / `experts.down_proj` where
    blocks hold experts (LoRA's possible targets), in module order over all blocks of every block list
    (a decoder's one; T5's encoder and decoder; a mixture of experts may have dense blocks too)."""
    from packtune.lora.experts import EXPERT_WEIGHTS
    from packtune.model.moe import Experts

    names: dict[str, None] = {}
    for layer in (block for blocks in model.block_lists for block in blocks):
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear | LoRALinear):
                names.setdefault(name.rsplit(".", 1)[-1])
            elif isinstance(m, Experts):
                names.update(dict.fromkeys(f"experts.{weight}" for weight in EXPERT_WEIGHTS))
    return tuple(names)


def base_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """The frozen base's storage dtype: a compute dtype (packtune.precision: `auto` is bf16 on GPU and
    fp32 on CPU); "nf4" stays a name."""
    return "nf4" if name == "nf4" else compute_dtype(name, device)


def apply_lora(model: nn.Module, spec: LoRASpec, storage: torch.dtype | str | None = None,
               generator: torch.Generator | None = None, nf4_others: torch.dtype | None = None
               ) -> dict[str, LoRALinear]:
    """Freeze `model` and add adapters in place (on meta too); returns the LoRA modules by name.

    `storage` converts the frozen base weights (a dtype, or "nf4"); None keeps them as they are.
    With "nf4", the other frozen parameters are stored in `nf4_others` (see `convert_base`).
    """
    from packtune.lora.experts import adapt_experts

    targets = spec.for_model(model).targets
    if spec.dropout and any(name.startswith("experts.") for name in targets):
        raise ConfigError(f"lora.dropout = {spec.dropout}: adapters on expert weights take no dropout (nor "
                          "do PEFT's target_parameters); set it to 0 or leave experts.* out of lora.targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in (block for blocks in model.block_lists for block in blocks):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, spec.rank, spec.scale, spec.dropout))
        mlp = getattr(layer, "mlp", None)  # T5's blocks have none: their feed-forward is a sublayer
        if all(isinstance(getattr(mlp, name, None), LoRALinear) for name in MLP_TARGETS):
            activation = "gelu_tanh" if mlp.act is geglu else "silu"
            layer.mlp = LoRAMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation)
    adapt_experts(model, targets, spec.rank, spec.scale)
    modules = lora_modules(model)
    if storage is not None:
        convert_base(model, storage, nf4_others)
    init_lora(model, generator)
    return modules


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA linears by their state-dict names (without the prefix activation checkpointing's
    wrapper adds to module names and removes from state dicts)."""
    return {name.replace("_checkpoint_wrapped_module.", ""): m for name, m in model.named_modules()
            if isinstance(m, LoRALinear)}


def is_lora_model(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@torch.no_grad()
def init_lora(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """(Re-)initialise every adapter as PEFT does, in module order, from `generator`."""
    for module in model.modules():
        if hasattr(module, "reset_lora") and not module.lora_A.is_meta:
            module.reset_lora(generator)


@torch.no_grad()
def convert_base(model: nn.Module, storage: torch.dtype | str, nf4_others: torch.dtype | None = None
                 ) -> None:
    """Store every frozen floating-point parameter in `storage`; "nf4" quantises the LoRA bases'
    weights and stores the other frozen parameters (embeddings, norms, lm_head) in `nf4_others`
    (None: as they are). `packtune train` passes the dtype it computes in: bf16 on GPU, fp32 on CPU,
    where torch's bf16 matmuls keep memory per distinct row length (oneDNN; it grows with packed rows)."""
    if storage == "nf4":
        from packtune.lora.experts import lora_experts
        from packtune.lora.qlora import to_nf4

        for module in lora_modules(model).values():
            module.weight = nn.Parameter(to_nf4(module.weight), requires_grad=False)
        for experts in lora_experts(model).values():  # torchao's NF4 is 2-D: [E * out, in] (see lora.experts)
            for name in experts.adapters:
                weight = getattr(experts, name)
                nf4 = to_nf4(weight.reshape(-1, weight.shape[-1]))
                setattr(experts, name, nn.Parameter(nf4, requires_grad=False))
        storage = nf4_others
    for module in model.modules() if storage is not None else ():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.requires_grad and p.is_floating_point() and p.dtype != storage and not is_nf4(p):
                setattr(module, name, nn.Parameter(p.to(storage), requires_grad=False))
    if hasattr(model, "tie_weights"):
        model.tie_weights()



def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def base_bytes(model: nn.Module) -> int:
    """Bytes the frozen parameters take in this process (NF4 weights at their packed size; a
    sharded parameter counts this rank's shard)."""
    from packtune.lora.qlora import nf4_bytes

    seen = {id(p): p for p in model.parameters() if not p.requires_grad}
    local = [p.to_local() if isinstance(p, DTensor) else p for p in seen.values()]
    return sum(nf4_bytes(p) if is_nf4(p) else p.numel() * p.element_size() for p in local)


def describe(model: nn.Module, spec: LoRASpec, storage: torch.dtype | str, whole_base: int | None = None,
             world_size: int = 1) -> str:
    """The line the run prints before step 1: adapters, trainable / total parameters, base memory.

    Sharded (`world_size` > 1, `model` holding this rank's shards): `whole_base` is the whole base's
    bytes (measured before sharding) and the line adds what this rank holds."""
    trainable, total = parameter_counts(model)
    name = storage if isinstance(storage, str) else str(storage).removeprefix("torch.")
    from packtune.lora.experts import lora_experts

    targets = ", ".join(spec.for_model(model).targets)
    n = len(lora_modules(model))
    experts = sum(len(m.adapters) for m in lora_experts(model).values())
    where = f"{n} linears" + (f" and {experts} expert weights" if experts else "")
    base = f"frozen base {(base_bytes(model) if whole_base is None else whole_base) / 2**20:.1f} MiB ({name})"
    if world_size > 1:
        base += (f" in all, {base_bytes(model) / 2**20:.1f} MiB on rank {torch.distributed.get_rank()} "
                 f"(sharded over {world_size} ranks)")
    return (f"lora: rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.scale:g}) on {where} "
            f"({targets}); trainable {trainable:,} of {total:,} parameters "
            f"({100 * trainable / max(total, 1):.2f}%); {base}")
