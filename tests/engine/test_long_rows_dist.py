"""Tiled MLP and activation offload under FSDP2: two gloo ranks with activation checkpointing, tiles
of 4 tokens and offloaded block inputs train exactly like one process with none of them, full
fine-tuning and LoRA. The ranks' rows differ in length, so they run different numbers of tiles: a
tile runs no collective (FSDP2 gathers a block's parameters once per forward and backward)."""

import json
import os
import sys

import torch
import torch.multiprocessing as mp
from test_train_dist import config, free_port, global_steps
from toy_training import ListSampler

from packtune.config import Config, LoRAConfig
from packtune.lora.training import lora_preparer
from packtune.model.hf_io import save_pretrained
from packtune.model.loading import fill_shards, load_for_training
from packtune.parallel import init_distributed, shutdown
from packtune.train import Trainer

STEPS = 3
LORA = LoRAConfig(rank=4, alpha=8.0)
LONG_ROWS = dict(activation_checkpointing=True, tiled_mlp=4, offload_activations=True)


def steps():
    return global_steps("token")[:STEPS]


def train(output_dir, dist_ctx, model_dir, lora: bool, rank_steps, **overrides):
    cfg = Config(train=config(output_dir, max_steps=STEPS, **overrides), lora=LORA if lora else LoRAConfig())
    prepare = lora_preparer(cfg, dist_ctx.device, sharded=dist_ctx.mesh is not None) if lora else None
    torch.manual_seed(0)
    model = load_for_training(model_dir, dist_ctx, prepare)
    trainer = Trainer(cfg.train, model, ListSampler(rank_steps), dist_ctx)
    if dist_ctx.mesh is not None:
        fill_shards(trainer.module, model_dir, dist_ctx, prepare)
    assert trainer.fit() == STEPS


def _worker(rank: int, world: int, port: int, root: str, model_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_ctx = init_distributed("cpu")
    mine = [mbs[2 * rank : 2 * rank + 2] for mbs in steps()]
    for lora in (False, True):
        train(f"{root}/fsdp-{lora}", dist_ctx, model_dir, lora, mine, **LONG_ROWS)
    shutdown(dist_ctx)
    sys.stdout.flush()
    os._exit(0)  # see test_train_dist: skip interpreter teardown under gloo


def test_tiled_offloaded_two_ranks_equal_plain_one_process(tmp_path):
    from toy_training import tiny_llama

    rows = steps()
    lengths = [[b.input_ids.numel() for b in mbs] for mbs in rows]
    assert any(len({n // 4 + (n % 4 > 0) for n in step}) > 1 for step in lengths)  # tile counts differ
    os.environ["OMP_NUM_THREADS"] = "1"
    model_dir = save_pretrained(tiny_llama(tied=True), tmp_path / "model")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), str(model_dir)), nprocs=2)
    torch.set_num_threads(1)
    for lora in (False, True):
        train(tmp_path / f"one-{lora}", init_distributed("cpu"), str(model_dir), lora, rows)

        def history(name):
            return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

        a, b = history(f"fsdp-{lora}"), history(f"one-{lora}")
        assert len(a) == len(b) == STEPS
        for ra, rb in zip(a, b, strict=True):
            assert ra["label_tokens"] == rb["label_tokens"]
            assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * rb["loss"], (lora, ra, rb)
            assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5 * rb["grad_norm"], (lora, ra, rb)
