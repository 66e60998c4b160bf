"""LoRA on a mixture of experts' 3-D weights (`experts.gate_up_proj`, `experts.down_proj`), in PEFT's
layout for `target_parameters` (peft.tuners.lora.ParamWrapper), so adapters move between packtune and
PEFT unchanged.

For a weight of E experts, `lora_A` is [r E, in] and `lora_B` [out, r E]; expert e's update is
scale * B_e A_e with A_e = lora_A[e r : (e + 1) r] and B_e = lora_B[:, e::E] (PEFT reshapes A
expert-major and B expert-minor), laid out as the weight is: out-by-in for Qwen3-MoE / Mixtral /
OLMoE ([E, out, in]), in-by-out for gpt-oss ([E, in, out]). `LoRAExperts` replaces a block's
`Experts` (keeping its weights under their names, frozen: bf16, fp32 or NF4) and hands the op
W + scale * B A for every targeted weight: one batched matmul per weight and step, the size of the
weight itself (a grouped LoRA inside the expert kernels would avoid that copy).

QLoRA: torchao's NF4 tensor holds at most two dimensions, so an adapted expert weight is quantised as
the 2-D view of its stored rows, [E * d1, d2] (blocks of 64 consecutive weights, which stay within one
expert's row whenever d2 is a multiple of 64, as in every released MoE), and dequantised back to
[E, d1, d2] when the step forms W + scale * B A. FSDP shards it on that first dimension, i.e. by expert.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from packtune.kernels.nf4_matmul import dense_weight, is_nf4
from packtune.model.moe import Experts

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
"""The experts' weights LoRA can adapt, in the order transformers declares them (PEFT nests its
wrappers in that order: the first targeted is the innermost `base_layer`)."""


class ParamLoRA(nn.Module):
    """The adapter of one expert weight of shape `shape` [E, d1, d2] (see the module docstring)."""

    def __init__(self, shape: torch.Size, rank: int, scale: float, transposed: bool,
                 device: torch.device | None = None) -> None:
        super().__init__()
        experts, d1, d2 = shape
        self.shape = torch.Size(shape)
        """The adapted weight's shape (an NF4 weight is stored 2-D, see the module docstring)."""
        self.in_features, self.out_features = (d1, d2) if transposed else (d2, d1)
        self.num_experts, self.rank, self.scale, self.transposed = experts, rank, scale, transposed
        factory = {"device": device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank * experts, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank * experts, **factory))
        if not self.lora_A.is_meta:
            self.reset_lora()

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """PEFT's init (its lora_A is an nn.Linear): A Kaiming-uniform (a = sqrt(5)), B zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B)

    def delta(self, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None) -> torch.Tensor:
        """scale * B_e A_e for every expert, in the weight's layout, from this module's adapters (or
        the given full ones: a gathered state dict's)."""
        lora_a = self.lora_A if lora_a is None else lora_a
        lora_b = self.lora_B if lora_b is None else lora_b
        a = lora_a.reshape(self.num_experts, self.rank, self.in_features)
        b = lora_b.reshape(self.out_features, self.rank, self.num_experts).permute(2, 0, 1)
        update = self.scale * torch.bmm(b, a)  # [E, out, in]
        return update.transpose(1, 2) if self.transposed else update

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}, scale={self.scale:g}")


class LoRAExperts(Experts):
    """A block's experts with adapters on the weights named in `targets` (of EXPERT_WEIGHTS)."""

    def __init__(self, base: Experts, targets: tuple[str, ...], rank: int, scale: float) -> None:
        nn.Module.__init__(self)
        self.fmt = base.fmt
        for name, param in base.named_parameters(recurse=False):
            setattr(self, name, param)
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            if not hasattr(self, name):
                setattr(self, name, None)
        weights = {name: getattr(self, name) for name in EXPERT_WEIGHTS if name in targets}
        self.adapters = nn.ModuleDict({name: ParamLoRA(w.shape, rank, scale, self.fmt.transposed, w.device)
                                       for name, w in weights.items()})

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        gate_up, down = (self._adapted(name, dtype) for name in EXPERT_WEIGHTS)
        return gate_up, down, *(None if b is None else b.to(dtype) for b in (self.gate_up_proj_bias,
                                                                              self.down_proj_bias))

    def _adapted(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The weight the op runs, in `dtype`: W (dequantised when NF4), plus scale * B A (formed in
        fp32, or the base's dtype when wider) when adapted."""
        weight = getattr(self, name)
        if name not in self.adapters:
            return dense_weight(weight, dtype)
        adapter = self.adapters[name]
        wide = torch.promote_types(torch.float32, torch.bfloat16 if is_nf4(weight) else weight.dtype)
        return (dense_weight(weight, wide).view(adapter.shape) + adapter.delta().to(wide)).to(dtype)


def lora_experts(model: nn.Module) -> dict[str, LoRAExperts]:
    """The adapted expert modules by their state-dict names (checkpoint wrappers' prefix removed)."""
    return {name.replace("_checkpoint_wrapped_module.", ""): m for name, m in model.named_modules()
            if isinstance(m, LoRAExperts)}


def adapt_experts(model: nn.Module, targets: tuple[str, ...], rank: int, scale: float) -> None:
    """Put adapters on every block's experts weights named in `targets` ("experts.gate_up_proj", ...)."""
    weights = tuple(name.removeprefix("experts.") for name in targets if name.startswith("experts."))
    if not weights:
        return
    for parent in list(model.modules()):
        experts = getattr(parent, "experts", None)
        if type(experts) is Experts:
            parent.experts = LoRAExperts(experts, weights, rank, scale)
