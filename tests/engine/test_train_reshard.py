"""A run saved by 2 ranks resumes in 1 process with twice the micro-batches, as if uninterrupted.

The sampler's rows_dealt counts rows of the global order of packed rows, so the resumed process
deals out exactly the rows the 2 ranks would have taken next; the sharded checkpoint reshards on
load. The resumed steps' losses and gradient norms equal the uninterrupted 2-rank run's to fp32
rounding.
"""

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import torch
import torch.multiprocessing as mp
from test_train_dist import free_port
from toy_training import tiny_llama

from packtune.config import TrainConfig
from packtune.data.packing import PackedRows
from packtune.data.sampler import PackedSampler
from packtune.parallel import init_distributed, shutdown
from packtune.train import Trainer

STEPS, SAVE_AT, MICRO = 8, 4, 2


def toy_rows() -> PackedRows:
    """Packed rows over a small in-memory tokenized dataset (prompt untrained, response trained)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 13, size=96)
    offsets = np.r_[0, np.cumsum(lengths)]
    tokens = rng.integers(0, 37, size=int(offsets[-1]))
    mask = np.zeros(len(tokens), dtype=bool)
    for start, n in zip(offsets[:-1], lengths, strict=True):
        mask[start + rng.integers(1, n) : start + n] = True
    dataset = SimpleNamespace(tokens=tokens, mask=mask, offsets=offsets, lengths=lengths)
    return PackedRows.packed(dataset, max_tokens=24)


def config(output_dir) -> TrainConfig:
    return TrainConfig(output_dir=str(output_dir), max_steps=STEPS, lr=1e-2, warmup=1, max_grad_norm=0.5,
                       save_every=SAVE_AT, keep_checkpoints=0)


def trainer(output_dir, rank: int, world: int, micro_batches: int, dist_ctx) -> Trainer:
    torch.manual_seed(0)
    sampler = PackedSampler(toy_rows(), seed=3, rank=rank, world_size=world, micro_batches=micro_batches)
    assert len(sampler) >= 2
    return Trainer(config(output_dir), tiny_llama(), sampler, dist_ctx)


def _worker(rank: int, world: int, port: int, output_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_ctx = init_distributed("cpu")
    assert trainer(output_dir, rank, world, MICRO, dist_ctx).fit() == STEPS
    shutdown(dist_ctx)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_save_one_process_with_twice_the_micro_batches_resumes(tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "two")), nprocs=2)
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    shutil.rmtree(tmp_path / "one" / "checkpoints" / f"step_{STEPS:08d}")

    torch.set_num_threads(1)
    resumed = trainer(tmp_path / "one", 0, 1, 2 * MICRO, init_distributed("cpu"))
    assert resumed.resume().name == f"step_{SAVE_AT:08d}"
    assert resumed.fit() == STEPS

    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a[SAVE_AT:], b[SAVE_AT:], strict=True):
        assert (ra["tokens"], ra["label_tokens"]) == (rb["tokens"], rb["label_tokens"])
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * ra["loss"]
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5 * ra["grad_norm"]
