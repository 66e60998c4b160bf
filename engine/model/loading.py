"""The run's model stage: the checkpoint loaded for training, in fp32 (the master weights), with
`prepare` applied (LoRA adapters: packtune.lora.training).

One process: the checkpoint loads directly. Several ranks: every rank builds the model on the meta
device (no memory); the Trainer shards it and allocates only the local shards; then `fill_shards`
has rank 0 alone read the checkpoint and broadcast it shard by shard, so host memory holds one
copy of the weights per node rather than one per GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from packtune.model.causal_lm import CausalLM
from packtune.parallel import DistContext

Prepare = Callable[[nn.Module], nn.Module]


def load_for_training(path: str | Path, dist_ctx: DistContext, prepare: Prepare | None = None) -> CausalLM:
    """The model to train: loaded (one process) or on the meta device, to be sharded and filled."""
    from packtune.model.families import build_model
    from packtune.model.hf_io import checkpoint_args, load_pretrained

    if dist_ctx.mesh is None:
        model = load_pretrained(path, dtype=torch.float32)
    else:  # the args as load_pretrained completes them from the stored names (T5's tied head)
        with torch.device("meta"):
            model = build_model(checkpoint_args(path)).to(torch.float32)
        model.source_dir = Path(path)
    return model if prepare is None else prepare(model)


def fill_shards(module: nn.Module, path: str | Path, dist_ctx: DistContext,
                prepare: Prepare | None = None) -> None:
    """Fill the allocated shards of `module` (the sharded training module, whose model is under
    `model.`) from the checkpoint that rank 0 reads, prepared as the meta model was."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from packtune.lora.sharded_nf4 import load_nf4_weights, nf4_weights
    from packtune.model.hf_io import load_pretrained

    full = {}
    if dist_ctx.is_main:
        loaded = load_pretrained(path, dtype=torch.float32)
        if prepare is not None:
            loaded = prepare(loaded)
        full = {f"model.{k}": v for k, v in loaded.state_dict().items()}
    # QLoRA: torchao's NF4 tensor cannot be broadcast; rank 0 holds those weights dense and every
    # rank quantises them (packtune.lora.sharded_nf4). The rest is broadcast as usual.
    nf4 = nf4_weights(module)
    dense = {name: full.pop(name) for name in nf4 if dist_ctx.is_main}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not nf4)
    set_model_state_dict(module, full, options=options)
    if nf4:
        load_nf4_weights(module, dense, dist_ctx.device)


def load_for_inference(path: str | Path, dtype: str = "auto", device: str | torch.device | None = None
                       ) -> CausalLM:
    """A model directory loaded for evaluation or generation, in eval mode, computing in `dtype`
    by packtune.precision's rule (`auto`: bf16 on a GPU, fp32 on a CPU, whatever the stored dtype)."""
    from packtune.model.hf_io import load_pretrained
    from packtune.precision import compute_dtype

    device = torch.device(device or "cpu")
    return load_pretrained(path, dtype=compute_dtype(dtype, device), device=device).eval()
