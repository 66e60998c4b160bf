"""Context parallelism: one packed row split into N contiguous token chunks over N ranks.

`[train] context_parallel = N` arranges the world's ranks as a dp x cp grid (rank = dp_rank x N +
cp_rank: a row's chunks on neighbouring ranks). The sampler deals rows over the dp ranks; the N
ranks of one dp rank receive the same row and each keeps its chunk (`context_chunk`): tokens
`[T c / N, T (c + 1) / N)` of the row's T, so chunks differ by at most one token and no padding is
added. Everything token-wise (embeddings, norms, MLPs, the loss) runs on the chunk alone.

Attention is Ulysses-style (DeepSpeed-Ulysses, ALST): q, k and v of the chunk, `[C, H, D]`, go
through one all-to-all that trades the sequence split for a head split, `[T, H / N, D]` (every
token of the row, H / N heads); each rank runs packtune's varlen attention over the whole row with
the row's own `cu_seqlens`, so no token attends across a sample boundary and a sample that spans two
chunks is attended exactly as whole; a second all-to-all trades back. RoPE is applied before the
exchange from each token's position within its sample (the chunk's slice of the row's positions).
When the kv heads do not divide by N they are replicated (each kv head repeated r times, the
smallest r for which N divides them and they still divide the query heads), as ALST does; query
heads that do not divide by N are refused (`check_model`).

The loss needs nothing of its own: labels are shifted per sample on the whole row when it is
collated (`shift_labels`), before the split, so a chunk's last token predicts the next chunk's first
token of the same sample; each chunk's label rows are its own, and the step's label and item counts,
its loss and the gradients are summed over all ranks, cp ranks included, as over dp ranks. FSDP2
shards the parameters over all dp x cp ranks (torchtitan's choice: it holds 1/(dp x cp) of them per
rank instead of 1/dp, and its reduce-scatter sums the cp ranks' gradient contributions); the
all-to-alls run on the cp ranks' own process group, over NCCL or gloo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from packtune.data.packing import PackedBatch
from packtune.errors import ConfigError
from packtune.kernels import PackedLayout, varlen_attention


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place among the ranks sharing a row: `rank` of `size`, talking over `group`."""

    group: dist.ProcessGroup
    rank: int
    size: int

    def chunk_bounds(self, tokens: int) -> list[int]:
        """Where each rank's chunk of a `tokens`-token row starts, and the row's end: `[size + 1]`."""
        return [tokens * c // self.size for c in range(self.size + 1)]


@dataclass(frozen=True)
class RowChunks:
    """One row split over the ranks of `cp`: `bounds[c]` is where rank c's chunk starts (`[size + 1]`,
    the row's end last). A chunk's layout carries it; the model's attention calls `attention`."""

    cp: ContextParallel
    bounds: tuple[int, ...]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, **options) -> torch.Tensor:
        """Varlen attention of this chunk's queries over the whole row (see the module docstring):
        q `[C, Hq, D]`, k/v `[C, Hk, D]` -> `[C, Hq, D]`; `cu_seqlens` / `max_seqlen` the whole row's,
        `options` as `varlen_attention`'s."""
        n = self.cp.size
        hq, hk = q.shape[1], k.shape[1]
        repeat = kv_repeat(hq, hk, n)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        split = (hq // n, k.shape[1] // n, k.shape[1] // n)
        sizes = np.diff(self.bounds).tolist()
        qkv = torch.cat([t.reshape(t.shape[0], n, -1, t.shape[-1]) for t in (q, k, v)], dim=2)
        qkv = _Exchange.apply(qkv.reshape(qkv.shape[0], -1, qkv.shape[-1]), sizes, self.cp, True)
        qh, kh, vh = qkv.split(split, dim=1)
        out = varlen_attention(qh, kh, vh, cu_seqlens, max_seqlen, **options)
        return _Exchange.apply(out, sizes, self.cp, False)


def kv_repeat(query_heads: int, kv_heads: int, size: int) -> int:
    """How many times each kv head is repeated so that `size` ranks get whole kv heads: the smallest r
    with size | kv_heads x r and kv_heads x r | query_heads."""
    for r in range(1, query_heads // kv_heads + 1):
        if (kv_heads * r) % size == 0 and query_heads % (kv_heads * r) == 0:
            return r
    raise ConfigError(f"train.context_parallel = {size}: {query_heads} attention heads do not divide by "
                      f"{size} (Ulysses attention gives every rank whole heads)")


def _exchange(x: torch.Tensor, sizes: list[int], cp: ContextParallel, to_heads: bool) -> torch.Tensor:
    """to_heads: this chunk's `[C, H, D]` -> the whole row's `[T, H / N, D]`; else the reverse."""
    n, me = cp.size, cp.rank
    if to_heads:
        chunk = x.shape[0]
        send = x.reshape(chunk, n, -1, x.shape[-1]).transpose(0, 1).contiguous()  # [N, C, H/N, D]
        out = x.new_empty(sum(sizes), send.shape[2], x.shape[-1])
        dist.all_to_all_single(out, send.reshape(-1, *send.shape[2:]), sizes, [chunk] * n, group=cp.group)
        return out
    heads = x.shape[1]
    got = x.new_empty(n * sizes[me], heads, x.shape[-1])
    dist.all_to_all_single(got, x.contiguous(), [sizes[me]] * n, sizes, group=cp.group)
    return got.reshape(n, sizes[me], heads, x.shape[-1]).transpose(0, 1).reshape(sizes[me], n * heads, -1)


class _Exchange(torch.autograd.Function):
    """The all-to-all between the sequence split and the head split; its gradient is the reverse."""

    @staticmethod
    def forward(ctx, x, sizes, cp, to_heads):
        ctx.sizes, ctx.cp, ctx.to_heads = sizes, cp, to_heads
        return _exchange(x, sizes, cp, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.sizes, ctx.cp, not ctx.to_heads), None, None, None


@dataclass(frozen=True)
class ChunkLayout(PackedLayout):
    """A chunk's layout: `positions`, `label_rows` and `num_label_rows` are the chunk's own;
    `cu_seqlens`, `max_seqlen` and `attended_length` the whole row's (what attention, run over the
    whole row after the exchange, and the FLOPs count read). `context`: the row's chunks, whose
    `attention` the model calls."""

    context: RowChunks | None = None


def context_chunk(batch: PackedBatch, cp: ContextParallel) -> PackedBatch:
    """This rank's chunk of a packed row (host tensors, before the batch moves to the device).

    The row's loss items go with the chunks: its label tokens (token weighting) each chunk counts
    its own; its samples or turns (sample / turn weighting, whose per-token weights are the row's)
    all count on chunk 0, so the step's sum over ranks is the row's."""
    if not isinstance(batch, PackedBatch) or batch.layout.cu_seqlens is None:
        raise ConfigError("train.context_parallel splits packed rows: set data.packing = true")
    bounds = cp.chunk_bounds(batch.input_ids.numel())
    start, end = bounds[cp.rank], bounds[cp.rank + 1]
    row = batch.layout
    rows = row.label_rows
    if rows is None:
        raise ValueError("context_chunk: the row's layout has no label rows")
    mine = rows[(rows >= start) & (rows < end)] - start
    layout = ChunkLayout(row.cu_seqlens, row.max_seqlen, row.positions[start:end], mine, mine.numel(),
                         row.attended_length, context=RowChunks(cp, tuple(bounds)))
    if batch.loss_weights is None:
        items = mine.numel()
    else:
        items = batch.num_items if cp.rank == 0 else 0
    weights = None if batch.loss_weights is None else batch.loss_weights[start:end]
    return replace(batch, input_ids=batch.input_ids[start:end], labels=batch.labels[start:end],
                   layout=layout, num_items=items, loss_weights=weights)


class ContextChunks:
    """A sampler whose rows (whole, dealt to this rank's dp rank) come out as this rank's chunks;
    everything else (length, epochs, resumable state) is the wrapped sampler's."""

    def __init__(self, sampler, cp: ContextParallel) -> None:
        self.sampler, self.cp = sampler, cp

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for micro_batches in self.sampler:
            yield [context_chunk(b, self.cp) for b in micro_batches]

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def check_model(model: torch.nn.Module, size: int) -> None:
    """Refuse, by name, a model whose attention cannot run context-parallel over `size` ranks."""
    args = getattr(model, "args", None)
    kind = getattr(args, "model_type", type(model).__name__)
    if not getattr(model, "context_parallel", False):
        raise ConfigError(f"train.context_parallel = {size}: {kind} models do not support context "
                          "parallelism (the Llama-like decoder families do)")
    scaling = getattr(args, "rope_scaling", None)
    if scaling is not None and scaling.rope_type == "longrope":
        raise ConfigError(f"train.context_parallel = {size}: longrope scaling ({kind}) chooses its factors "
                          "per sample, which a chunk of the row cannot; train without context parallelism")
    kv_repeat(args.num_attention_heads, args.num_key_value_heads, size)


def init_context_parallel(device_type: str, world_size: int, rank: int, size: int) -> ContextParallel:
    """The dp x cp grid's cp group of this rank (collective: every rank calls it)."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % size:
        raise ConfigError(f"train.context_parallel = {size} needs a multiple of {size} ranks; this run has "
                          f"{world_size}")
    grid = init_device_mesh(device_type, (world_size // size, size), mesh_dim_names=("dp", "cp"))
    return ContextParallel(grid.get_group("cp"), rank % size, size)


def chunk_layouts(rows, size: int) -> dict[int, int]:
    """Rows by the most chunks one of their samples spans when split over `size` ranks (1: no sample
    crosses a chunk boundary), for the data report."""
    counts: dict[int, int] = {}
    lengths = rows.dataset.lengths[rows.order].astype(np.int64)
    row_of = np.repeat(np.arange(len(rows)), np.diff(rows.offsets))
    ends = np.cumsum(lengths)
    row_start = np.concatenate([[0], ends])[rows.offsets[:-1]]
    end_in_row = ends - row_start[row_of]
    start_in_row = end_in_row - lengths
    row_tokens = end_in_row[rows.offsets[1:] - 1] if len(lengths) else np.zeros(0, dtype=np.int64)
    total = row_tokens[row_of]
    chunk_of = lambda t: ((t + 1) * size - 1) // total  # the chunk of token t: chunk_bounds' inverse
    spans = chunk_of(end_in_row - 1) - chunk_of(start_in_row) + 1
    most = np.zeros(len(rows), dtype=np.int64)
    np.maximum.at(most, row_of, spans)
    for value, n in zip(*np.unique(most, return_counts=True), strict=True):
        counts[int(value)] = int(n)
    return counts
