"""linear_cross_entropy with an FSDP2-style sharded lm_head (a DTensor weight, Shard(0)) on two
gloo ranks: each rank's shard of dW must be its rows of the SUM over ranks of the full dW (each
rank's loss covers only its own tokens), and bf16 hidden states must work over the fp32 master
weight. A plain `full_tensor()` gave each shard only its own rank's gradient.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from packtune.kernels import linear_cross_entropy
from packtune.parallel import wait_for_idle_gloo_workers

WORLD, N, H, V = 2, 10, 8, 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    hidden = torch.randn(WORLD, N, H, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (WORLD, N), generator=gen)
    labels[:, ::3] = -100
    return weight, hidden, labels


def _summed_reference_grad(weight, hidden, labels) -> torch.Tensor:
    """The sum over ranks of d(rank's loss)/dW, each loss a sum over that rank's label rows."""
    w = weight.clone().requires_grad_()
    total = sum(torch.nn.functional.cross_entropy(hidden[r] @ w.t(), labels[r], reduction="sum")
                for r in range(WORLD))
    return torch.autograd.grad(total, w)[0]


def _worker(rank: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        weight, hidden, labels = _data()
        expected = _summed_reference_grad(weight, hidden, labels).chunk(WORLD)[rank]
        for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            head = torch.nn.Linear(H, V, bias=False)
            head.weight = torch.nn.Parameter(distribute_tensor(weight.float(), mesh, [Shard(0)]))
            x = hidden[rank].to(dtype).requires_grad_()
            loss = linear_cross_entropy(x, head, labels[rank], reduction="sum", chunk_size=4)
            loss.backward()
            grad = head.weight.grad
            assert grad.placements == (Shard(0),) and grad.dtype == torch.float32
            torch.testing.assert_close(grad.to_local().double(), expected, rtol=rtol,
                                       atol=rtol * expected.abs().max().item())
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()
        wait_for_idle_gloo_workers()  # else gloo can abort this process at exit (packtune.parallel)


def test_sharded_lm_head_gets_the_sum_of_the_ranks_gradients():
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD)
