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
module: the dense MLP, LoRA's fused `LoRAMLP`, a mixture-of-experts block's experts (given each
token's routing as further token-wise inputs; the router runs over the whole row, see tile_mlps).

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
    model's `args.intermediate_size` (a mixture of experts': the larger of it and the k routed
    experts' `k x moe_intermediate_size` per token)."""
    if setting is False:
        return None
    if setting == "auto":
        args = getattr(model, "args", None)
        intermediate = getattr(args, "intermediate_size", None)
        routed = getattr(args, "num_experts_per_tok", 0) * getattr(args, "moe_intermediate_size", 0)
        intermediate = max(intermediate, routed) if intermediate is not None else None
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
    """forward(module_forward, tile_tokens, inputs, *inputs' tensors, *trainable parameters): the
    module over tiles of the tokens of its `inputs` token-wise inputs (x first), keeping only the
    output; backward: each tile recomputed and differentiated alone."""

    @staticmethod
    def forward(ctx, module_forward, tile_tokens: int, inputs: int, *tensors: torch.Tensor):
        x = tensors[0]
        flat = [t.reshape(x.numel() // x.shape[-1], -1) for t in tensors[:inputs]]
        bounds = tile_bounds(flat[0].shape[0], tile_tokens)
        rng, out = [], None
        for start, end in bounds:
            rng.append(_rng_states(x.device))
            with _throwaway_graph():
                part = module_forward(*(t[start:end].detach() for t in flat)).detach()
            if out is None:
                out = part.new_empty(*x.shape[:-1], part.shape[-1])
            out.view(-1, part.shape[-1])[start:end] = part
        ctx.module_forward, ctx.bounds, ctx.rng, ctx.inputs = module_forward, bounds, rng, inputs
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        tensors = ctx.saved_tensors
        shapes = [t.shape for t in tensors[:ctx.inputs]]
        flat = [t.reshape(shapes[0].numel() // shapes[0][-1], -1) for t in tensors[:ctx.inputs]]
        params = list(tensors[ctx.inputs:])
        grad_out = grad_out.reshape(flat[0].shape[0], -1)
        wanted = ctx.needs_input_grad[3:3 + ctx.inputs]
        grad_inputs = [torch.empty_like(t) if want else None for t, want in zip(flat, wanted, strict=True)]
        grads: list[torch.Tensor | None] = [None] * len(params)
        device = flat[0].device
        devices = [device] if device.type == "cuda" else []
        for (start, end), (cpu_rng, cuda_rng) in zip(ctx.bounds, ctx.rng, strict=True):
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, device)
                tiles = [t[start:end].detach().requires_grad_(want)
                         for t, want in zip(flat, wanted, strict=True)]
                out = ctx.module_forward(*tiles)
            differentiated = [t for t, want in zip(tiles, wanted, strict=True) if want] + params
            tile_grads = list(torch.autograd.grad(out, differentiated, grad_out[start:end],
                                                  allow_unused=True))
            for grad_input in grad_inputs:
                if grad_input is not None:
                    grad_input[start:end] = tile_grads.pop(0)
            for i, g in enumerate(tile_grads):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
            del out, tile_grads
        grad_inputs = [None if g is None else g.view(shape)
                       for g, shape in zip(grad_inputs, shapes, strict=True)]
        return None, None, None, *grad_inputs, *grads


def tiled_forward(module: nn.Module, tile_tokens: int, x: torch.Tensor, *token_wise: torch.Tensor
                  ) -> torch.Tensor:
    """`module`'s class forward over tiles of `tile_tokens` tokens (x `[..., H]`, and any further
    inputs with one entry per token of x, such as a router's choices); a row of at most one tile, or a
    call without a graph, runs the plain forward."""
    plain = functools.partial(type(module).forward, module)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tokens <= tile_tokens or not torch.is_grad_enabled():
        return plain(x, *token_wise)
    params = [p for p in module.parameters() if p.requires_grad]
    return _TiledForward.apply(plain, tile_tokens, 1 + len(token_wise), x, *token_wise, *params)


def tile_mlp(module: nn.Module, tile_tokens: int) -> None:
    """Run `module` (token-wise: each token's output depends on that token alone) over tiles of
    `tile_tokens` tokens from now on; see the module docstring."""
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be >= 1, got {tile_tokens}")
    module.forward = functools.partial(tiled_forward, module, tile_tokens)


def tile_mlps(blocks: nn.ModuleList, tile_tokens: int) -> int:
    """Tile the `mlp` of every decoder block in `blocks`; returns how many were tiled. A
    mixture-of-experts block's experts are tiled, not the block: its router runs over the whole row
    (its load-balancing and z losses span the row; its logits are only `[tokens x experts]`) and
    the experts, token-wise given each token's choices and weights, run tile by tile."""
    tiled = 0
    for block in blocks:
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, nn.Module):
            tile_mlp(mlp.experts if isinstance(mlp, SparseMoeBlock) else mlp, tile_tokens)
            tiled += 1
    return tiled
