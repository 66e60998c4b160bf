"""QLoRA under FSDP2: NF4 base weights filled into FSDP's shards, and gathered back for the export.

FSDP2 shards torchao's NF4Tensor itself (torchao implements `torch.chunk` on dim 0 and FSDP's
all-gather hooks for it), but a sharded run loads by rank 0 broadcasting the full state dict, and
torchao cannot broadcast an NF4 tensor (`NF4Tensor dispatch: c10d.broadcast_`). So rank 0 keeps
those weights dense (bf16, what `to_nf4` quantises anyway) and broadcasts them one layer at a
time; every rank quantises the *whole* layer and keeps the dim-0 chunk FSDP would keep. Quantising
a shard alone would differ: the double quantisation subtracts the mean of the whole layer's block
scales. The result is what sharding a one-process run's NF4 weights gives, bit for bit.

torchao's NF4 sharding is even only: every rank's chunk must hold whole rows and whole groups of
quantised scales, which `check_nf4_shardable` checks before anything is loaded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from packtune.errors import ConfigError
from packtune.kernels.lora import dense_weight
from packtune.kernels.nf4_matmul import is_nf4
from packtune.lora.qlora import to_nf4


def check_nf4_shardable(model: nn.Module, world_size: int) -> None:
    """Refuse, naming the layer, NF4 weights that do not split evenly over `world_size` ranks."""
    for name, weight in model.named_parameters():
        if not is_nf4(weight):
            continue
        groups = weight.quantization_factor.numel()  # groups of quantised block scales
        if weight.shape[0] % world_size or groups % world_size:
            raise ConfigError(
                f"lora.base_dtype = \"nf4\" over {world_size} ranks: {name} {tuple(weight.shape)} "
                f"has {weight.shape[0]} rows and {groups} groups of quantised scales; FSDP shards NF4 "
                f"weights only evenly (both divisible by {world_size}); use a world size that divides "
                "them or base_dtype = \"bfloat16\"")


def nf4_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The NF4 weights of a model, by state-dict name (the same order on every rank): FSDP's
    DTensor shards of them, or whole NF4 tensors (no FSDP, or FSDP on one rank, see parallelize)."""
    return {name: p for name, p in module.state_dict(keep_vars=True).items()
            if is_nf4(p.to_local() if isinstance(p, DTensor) else p)}


@torch.no_grad()
def load_nf4_weights(module: nn.Module, dense: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill `module`'s NF4 weights from rank 0's dense weights `dense` (by state-dict name; empty on
    the other ranks): broadcast, quantise the whole layer on every rank, keep this rank's chunk."""
    rank = dist.get_rank()
    for name, param in nf4_weights(module).items():
        full = dense.pop(name).to(device, torch.bfloat16).reshape(param.shape) if rank == 0 else \
            torch.empty(param.shape, dtype=torch.bfloat16, device=device)  # reshape: experts' 2-D NF4
        dist.broadcast(full, src=0)
        value = to_nf4(full)
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            chunk = torch.chunk(value, mesh.size(), dim=0)[mesh.get_local_rank()]
            value = DTensor.from_local(chunk, mesh, param.placements, shape=param.shape,
                                       stride=param.stride(), run_check=False)
        # assign=True: the new tensor replaces the empty one (FSDP's load hook re-registers a shard)
        module.load_state_dict({name: value}, strict=False, assign=True)
    if dense:
        raise AssertionError(f"dense weights without an NF4 parameter: {sorted(dense)[:4]}")


def gather_full_state(module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) model's state dict, whole and on the CPU (collective: every rank
    calls it; only `keep` ranks return the tensors). NF4 weights are dequantised first (bf16, as the
    LoRA kernels dequantise them), so an NF4 weight comes back as the dense base the run trained over."""
    state, gathered = {}, {}
    for name, param in module.state_dict(keep_vars=True).items():
        if id(param) not in gathered:  # a tied weight is gathered once
            tensor = param.detach()
            if isinstance(tensor, DTensor):
                local = tensor.to_local()
                if is_nf4(local):
                    local = dense_weight(local, torch.bfloat16)
                tensor = DTensor.from_local(local, tensor.device_mesh, tensor.placements, shape=tensor.shape,
                                            stride=tensor.stride(), run_check=False).full_tensor()
            elif is_nf4(tensor):
                tensor = dense_weight(tensor, torch.bfloat16)
            gathered[id(param)] = tensor.cpu() if keep else None
        if keep:
            state[name] = gathered[id(param)]
    return state
