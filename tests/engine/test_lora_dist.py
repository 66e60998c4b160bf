"""LoRA under FSDP2: two gloo ranks (meta model, rank 0 broadcasting base and initial adapters,
activation checkpointing) train exactly like one process; only adapters are in the optimizer and
the checkpoint, and the sharded checkpoint resumes in one process."""

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from test_train_dist import config, free_port, global_steps
from toy_training import ListSampler, tiny_llama

from packtune.config import Config, LoRAConfig
from packtune.launch import export_model, load_model
from packtune.lora import read_adapter
from packtune.lora.training import lora_preparer
from packtune.model.hf_io import save_pretrained
from packtune.parallel import init_distributed, shutdown
from packtune.train import Trainer

STEPS = 5
LORA = LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])


def run_config(output_dir, **overrides) -> Config:
    return Config(train=config(output_dir, **overrides), lora=LORA)


def _worker(rank: int, world: int, port: int, output_dir: str, model_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_ctx = init_distributed("cpu")
    torch.manual_seed(0)
    steps = [mbs[2 * rank : 2 * rank + 2] for mbs in global_steps("token")]
    cfg = run_config(output_dir, activation_checkpointing=True, save_every=STEPS)
    prepare = lora_preparer(cfg, dist_ctx.device, sharded=True)
    model, load_weights = load_model(model_dir, torch.float32, dist_ctx, prepare)
    trainer = Trainer(cfg.train, model, ListSampler(steps), dist_ctx, load_weights=load_weights)
    assert trainer.fit() == STEPS
    export_model(trainer, cfg)
    shutdown(dist_ctx)
    # The worker's checks are done. Leave without interpreter teardown: under load, gloo's threads
    # occasionally abort a 2-rank child at exit ("terminate called without an active exception")
    # after everything passed, which mp.spawn reports as a failure.
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.slow
def test_two_fsdp_ranks_equal_one_process_with_lora(tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    model_dir = save_pretrained(tiny_llama(tied=True), tmp_path / "model")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "fsdp"), str(model_dir)), nprocs=2)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist_ctx = init_distributed("cpu")
    cfg = run_config(tmp_path / "single")
    prepare = lora_preparer(cfg, dist_ctx.device, sharded=False)
    model, _ = load_model(str(model_dir), torch.float32, dist_ctx, prepare)
    single = Trainer(cfg.train, model, ListSampler(global_steps("token")), dist_ctx)
    trainable = [p for p in single.model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in single.optimizer.param_groups) == len(trainable) == 2 * 5 * 2
    single.fit()

    def losses(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    a, b = losses("fsdp"), losses("single")
    assert len(a) == len(b) == STEPS
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * rb["loss"]
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5 * rb["grad_norm"]
    _, exported = read_adapter(tmp_path / "fsdp" / "final")
    reference = {n: p for n, p in single.model.named_parameters() if p.requires_grad}
    assert exported.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(exported[name], value.detach(), rtol=0, atol=1e-5, msg=name)

    prepare = lora_preparer(cfg, dist_ctx.device, sharded=False)
    resumed_model, _ = load_model(str(model_dir), torch.float32, dist_ctx, prepare)
    resumed = Trainer(config(tmp_path / "fsdp"), resumed_model, ListSampler(global_steps("token")), dist_ctx)
    assert resumed.resume().name == f"step_{STEPS:08d}"
    for name, value in resumed.model.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5, msg=name)
