"""Tiled MLP: a token-wise module run over tiles of a long row, recomputed tile by tile in the backward.

An MLP's activations are `[tokens x intermediate]` (the gate, the up projection, their product), the
largest tensors of a decoder block: with activation checkpointing they are what a long row's
recomputed block holds at its peak. `tile_mlp(module, tile_tokens)` makes the module's forward run
`tile_tokens` tokens at a time keeping only its output and its backward recompute
each tile with a graph, take that tile's gradients and free it before the next, so the live memory
is O(tile x intermediate) whatever the row length (ALST's TiledMLP). Values and gradients are the
untiled module's up to floating-point rounding: every token's output depends on that token alone,
and the parameter gradients are the sums over tiles of the same per-token terms.

The wrapper replaces the instance's `forward` (the module, its parameters and their names stay as
they are, so checkpoints, LoRA targets and the export see nothing), and works for any token-wise
module: the dense MLP, LoRA's fused `LoRAMLP` (a mixture-of-experts block, whose router loss spans the
row, is refused).

Why it is safe under FSDP2 with any number of ranks, each tiling its own row length: the units FSDP
shards are the decoder blocks, and FSDP2 all-gathers a block's parameters once, before the block's
forward (and again before its backward); inside, the MLP's forward is a plain call on unsharded
parameters, so a tile runs no collective and ranks may run different numbers of tiles. (A module
that communicates inside its forward, such as expert parallelism, would need every rank to run the
same number of tiles; packtune has none.) The recomputation happens inside the block's backward,
after FSDP2's pre-backward all-gather and before its post-backward reduce-scatter, and the
parameter gradients are returned to autograd, which accumulates them where FSDP2 reads them. Under
activation checkpointing the block's recomputed forward runs the tiles without a graph again; the
random state (LoRA dropout draws its seeds from torch's generator) is replayed per tile.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from packtune.errors import ConfigError
from packtune.model.moe import SparseMoeBlock

AUTO_TILE_BYTES = 32 * 2**20
"""`tiled_mlp = "auto"`: a tile's `[tile x intermediate]` fp32 activation is at most this."""
AUTO_MIN_TILE = 256


def auto_tile_tokens(intermediate_size: int) -> int:
    """The tile of `tiled_mlp = "auto"`: the largest power of two of tokens whose fp32
    `[tile x intermediate]` activation fits AUTO_TILE_BYTES, at least AUTO_MIN_TILE (4096 tokens for
    SmolLM2-135M's 1536, 1024 for Llama-3.2-1B's 8192, 512 for Llama-3.1-8B's 14336)."""
    fit = max(AUTO_TILE_BYTES // (4 * intermediate_size), 1)
    return max(1 << (fit.bit_length() - 1), AUTO_MIN_TILE)


def resolve_tile_tokens(setting: bool | int | str, model: nn.Module) -> int | None:
    """`[train] tiled_mlp` as a tile size in tokens for `model` (None: no tiling); "auto" reads the
    model's `args.intermediate_size`."""
    if setting is False:
        return None
    if setting == "auto":
        intermediate = getattr(getattr(model, "args", None), "intermediate_size", None)
        if intermediate is None:
            raise ValueError(f'tiled_mlp = "auto": {type(model).__name__} has no args.intermediate_size; '
                             "give a tile size in tokens")
        return auto_tile_tokens(intermediate)
    return int(setting)


def tile_bounds(tokens: int, tile_tokens: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile_tokens, tokens)) for start in range(0, tokens, tile_tokens)]


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _throwaway_graph():
    """Grad mode on, as in the training forward the tile belongs to (LoRA applies dropout only in
    forwards that build a graph), with what the tile saves kept by plain references, out of reach
    of any enclosing saved-tensor hooks (activation checkpointing's, offload's): the graph is
    dropped with the tile's output, so the forward holds one tile's activations at a time."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


class _TiledForward(torch.autograd.Function):
    """forward(module_forward, tile_tokens, x, *trainable parameters): the module over tiles of x's
    tokens, keeping only the output; backward: each tile recomputed and differentiated alone."""

    @staticmethod
    def forward(ctx, module_forward, tile_tokens: int, x: torch.Tensor, *params: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])
        bounds = tile_bounds(flat.shape[0], tile_tokens)
        rng, out = [], None
        for start, end in bounds:
            rng.append(_rng_states(x.device))
            with _throwaway_graph():
                part = module_forward(flat[start:end].detach()).detach()
            if out is None:
                out = part.new_empty(*x.shape[:-1], part.shape[-1])
            out.view(-1, part.shape[-1])[start:end] = part
        ctx.module_forward, ctx.bounds, ctx.rng = module_forward, bounds, rng
        ctx.save_for_backward(x, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *params = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        grad_out = grad_out.reshape(flat.shape[0], -1)
        want_x = ctx.needs_input_grad[2]
        grad_x = torch.empty_like(flat) if want_x else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        devices = [x.device] if x.device.type == "cuda" else []
        for (start, end), (cpu_rng, cuda_rng) in zip(ctx.bounds, ctx.rng, strict=True):
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, x.device)
                tile = flat[start:end].detach().requires_grad_(want_x)
                out = ctx.module_forward(tile)
            inputs = ([tile] if want_x else []) + params
            tile_grads = torch.autograd.grad(out, inputs, grad_out[start:end], allow_unused=True)
            if want_x:
                grad_x[start:end] = tile_grads[0]
                tile_grads = tile_grads[1:]
            for i, g in enumerate(tile_grads):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
            del out, tile_grads
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return None, None, grad_x, *grads


def tiled_forward(module: nn.Module, tile_tokens: int, x: torch.Tensor) -> torch.Tensor:
    """`module`'s class forward over tiles of `tile_tokens` tokens (x `[..., H]`); a row of at most
    one tile, or a call without a graph, runs the plain forward."""
    plain = functools.partial(type(module).forward, module)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tokens <= tile_tokens or not torch.is_grad_enabled():
        return plain(x)
    params = [p for p in module.parameters() if p.requires_grad]
    return _TiledForward.apply(plain, tile_tokens, x, *params)


def tile_mlp(module: nn.Module, tile_tokens: int) -> None:
    """Run `module` (token-wise: each token's output depends on that token alone) over tiles of
    `tile_tokens` tokens from now on; see the module docstring."""
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be >= 1, got {tile_tokens}")
    module.forward = functools.partial(tiled_forward, module, tile_tokens)


def tile_mlps(blocks: nn.ModuleList, tile_tokens: int) -> int:
    """Tile the `mlp` of every decoder block in `blocks`; returns how many were tiled. A
    mixture-of-experts block is refused: its forward also takes the row's real-token mask and returns
    the router's load, which a tile's recomputation would have to gather across tiles."""
    if any(isinstance(getattr(block, "mlp", None), SparseMoeBlock) for block in blocks):
        raise ConfigError("train.tiled_mlp: not supported for mixture-of-experts models yet (the expert "
                          "blocks' router losses are computed over the whole row); set tiled_mlp = false")
    tiled = 0
    for block in blocks:
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, nn.Module):
            tile_mlp(mlp, tile_tokens)
            tiled += 1
    return tiled
