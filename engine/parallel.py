"""Processes, devices and FSDP2 sharding.

One code path from a single CPU process to many GPUs: `torchrun` sets RANK/WORLD_SIZE, we join a
process group (gloo on CPU; `cuda:nccl,cpu:gloo` on GPU so that host-side counts travel over
gloo without touching the GPU stream) and build an explicit device mesh, because FSDP2 places
parameters on the mesh's device type (a CUDA machine with a gloo default group otherwise breaks,
pytorch/pytorch#132471).

`parallelize` wraps in torchtitan's order: activation checkpointing -> optional torch.compile
per block -> `fully_shard` per block -> `fully_shard` on the root.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from packtune.kernels.nf4_matmul import is_nf4

if TYPE_CHECKING:
    from packtune.context_parallel import ContextParallel


@dataclass
class DistContext:
    """Where this process runs and whom it trains with."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None
    """The 1-D mesh of all ranks FSDP shards over; None for a single CPU process (no process group,
    no FSDP)."""
    context: ContextParallel | None = None
    """The ranks this rank shares each row with (`[train] context_parallel`, packtune.context_parallel);
    None without context parallelism."""
    processes: list[tuple[str, int]] = field(default_factory=list)
    """(host, pid) of every rank, by rank: who to look for when a collective fails (packtune.rank_loss)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's place among the ranks that get rows of their own (the sampler's rank)."""
        return self.rank if self.context is None else self.rank // self.context.size

    @property
    def dp_size(self) -> int:
        """How many ranks get rows of their own: the world size over the context-parallel size."""
        return self.world_size if self.context is None else self.world_size // self.context.size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum in place across ranks (no-op in a single process). CPU tensors go over gloo."""
        if self.mesh is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()

    def all_gather_texts(self, texts: list[str]) -> list[list[str]]:
        """Every rank's `texts`, by rank. They travel as UTF-8 JSON in CPU tensors (gloo): no pickle."""
        if self.mesh is None:
            return [texts]
        data = torch.frombuffer(bytearray(json.dumps(texts).encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([data.numel()]))
        longest = max(int(n) for n in sizes)
        parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(parts, torch.cat([data, data.new_zeros(longest - data.numel())]))
        return [json.loads(bytes(part[: int(n)].tolist()).decode())
                for part, n in zip(parts, sizes, strict=True)]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is this process's GPU (LOCAL_RANK under torchrun) when CUDA is available, else CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device: str = "auto", *, mixed_precision: bool = False,
                     context_parallel: int = 1) -> DistContext:
    """Join the process group torchrun describes in the environment, or run alone.

    A single CUDA process still gets a one-rank group and mesh so that FSDP2's mixed precision
    (bf16 compute, fp32 master weights and reduction) applies the same way as on many GPUs; so
    does a single CPU process asked for `mixed_precision` (model.dtype = "bfloat16").
    `context_parallel` > 1 groups the ranks that split each row (packtune.context_parallel).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world_size == 1 and dev.type == "cpu" and not mixed_precision and context_parallel == 1:
        return DistContext(0, 1, 0, dev, None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:  # one process started without torchrun
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("dp",))
    context = None
    if context_parallel > 1:
        from packtune.context_parallel import init_context_parallel

        context = init_context_parallel(dev.type, world_size, rank, context_parallel)
    dist_ctx = DistContext(rank, world_size, local_rank, dev, mesh, context)
    gathered = dist_ctx.all_gather_texts([socket.gethostname(), str(os.getpid())])
    dist_ctx.processes = [(host, int(pid)) for host, pid in gathered]
    return dist_ctx


def shutdown(dist_ctx: DistContext, clean: bool = True) -> None:
    """Tear the process group down: `clean`, once every rank is done with it (a barrier); else (this
    rank failed, or another rank is gone) at once, without waiting for the others.

    Then wait until gloo's worker threads are idle. destroy_process_group does not join them (only
    the group's destructor does, and FSDP's modules and DTensor's caches keep the group alive until
    the interpreter exits), and a worker that finishes its last collective late, after the main
    thread has begun finalizing the interpreter, releases that collective's tensors, takes the GIL
    and is ended by Python with pthread_exit, which unwinds through a noexcept frame:
    "terminate called without an active exception", an abort after the run's last line
    (pytorch/pytorch#190489)."""
    if dist_ctx.mesh is None or not dist.is_initialized():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        wait_for_idle_gloo_workers()


_GLOO_WORKER = "pt_gloo_runloop"


def wait_for_idle_gloo_workers(timeout: float = 10.0) -> None:
    """Return once every gloo worker thread of this process has been asleep (waiting for work) in
    three samples 10 ms apart, the GIL free in between; at most `timeout` seconds. Linux: the threads
    are found by name in /proc/self/task (elsewhere, or without named threads, it returns at once)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return
    deadline, asleep = time.monotonic() + timeout, 0
    while asleep < 3 and time.monotonic() < deadline:
        states = []
        for task in tasks.iterdir():
            try:
                if (task / "comm").read_text().strip() == _GLOO_WORKER:
                    states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:  # the thread ended meanwhile
                continue
        asleep = asleep + 1 if all(state == "S" for state in states) else 0
        if asleep < 3:
            time.sleep(0.01)  # releases the GIL: a worker waiting for it to free a tensor gets it


def parallelize(
    root: nn.Module,
    blocks: nn.ModuleList | Sequence[nn.ModuleList],
    dist_ctx: DistContext,
    *,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    mixed_precision: bool | None = None,
    preserve_rng_state: bool = False,
) -> nn.Module:
    """Wrap `blocks` (a ModuleList inside `root`, or several: an encoder-decoder's `block_lists`) in
    place and shard `root`; returns `root`.

    Gradients are *summed* over ranks, not averaged: the loss is already divided by the global
    label-token count of the step (docs/how-it-works.md, the loss contract), so FSDP's division by the world
    size is switched off on every FSDP unit (sum-only collectives, so gloo works too).
    `mixed_precision` defaults to True on CUDA: parameters gathered in bf16, gradients reduced
    in fp32, the sharded fp32 parameters kept as master weights for the optimizer.
    `preserve_rng_state`: blocks that draw random numbers (LoRA dropout) replay the same draws
    when activation checkpointing recomputes them.
    """
    block_lists = (blocks,) if isinstance(blocks, nn.ModuleList) else tuple(blocks)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for blocks in block_lists:
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block, preserve_rng_state=preserve_rng_state)
    if compile_blocks:
        for block in (block for blocks in block_lists for block in blocks):
            block.compile(fullgraph=False)
    if dist_ctx.mesh is None:
        return root
    if mixed_precision is None:
        mixed_precision = dist_ctx.device.type == "cuda"
    policy = MixedPrecisionPolicy()
    if mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # On one rank FSDP2 (torch 2.13) unshards a tensor subclass from its first all-gather input
    # only, and torchao's NF4 tensor has three: there the NF4 weights stay whole, outside FSDP.
    ignored = {p for p in root.parameters() if is_nf4(p)} if dist_ctx.world_size == 1 else None
    for block in (block for blocks in block_lists for block in blocks):
        fully_shard(block, mesh=dist_ctx.mesh, mp_policy=policy, ignored_params=ignored)
    # The root's inputs include the float `num_items` count, which must not be rounded to bf16.
    root_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype, cast_forward_inputs=False
    )
    fully_shard(root, mesh=dist_ctx.mesh, mp_policy=root_policy, ignored_params=ignored)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return root


@contextmanager
def gathered_parameters(root: nn.Module) -> Iterator[None]:
    """Every FSDP unit of `root` unsharded, and kept so through any number of forwards, until the
    block ends; then resharded. Inside, each rank may run forwards of its own (generation, a
    different number of steps per rank) with no collective in between; the price is every
    parameter gathered on every rank meanwhile. Without FSDP (a single CPU process) a no-op."""
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    blocks = [m for m in units if m is not root]  # fully_shard's default for them: reshard after forward
    for unit in blocks:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:  # the same order on every rank: the all-gathers pair up
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in blocks:
            unit.set_reshard_after_forward(True, recurse=False)
