"""Two FSDP2 ranks (gloo, CPU) train exactly like one process on the same global batches.

The real Llama with tied embeddings (the shared weight lives in the root FSDP unit that the
fused loss reads), built on the meta device and filled by rank 0's broadcast, activation
checkpointing on the sharded run, the Hugging Face export gathered from the shards, and the
sharded checkpoint resumed in one process; with token and with turn loss weighting (the
normalizer, a global count of turns, summed across ranks); and a mixture of experts (its 3-D expert
weights sharded on the experts, its load-balancing loss the mean over the step's micro-batches on
every rank alike).
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from toy_training import ListSampler, tiny_gemma, tiny_llama, tiny_moe, toy_steps

from packtune.config import Config, TrainConfig
from packtune.export import export_model
from packtune.model.hf_io import load_pretrained, save_pretrained
from packtune.model.loading import fill_shards, load_for_training
from packtune.parallel import init_distributed, shutdown
from packtune.train import Trainer

STEPS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_steps(weighting: str):
    """5 steps of 4 packed rows with uneven label counts; rank r takes rows 2r and 2r+1."""
    return toy_steps(STEPS, micro_batches=4, per_micro=3, seed=5, weighting=weighting,
                     turns=1 if weighting == "token" else 2)


def config(output_dir, **overrides) -> TrainConfig:
    cfg = TrainConfig(output_dir=str(output_dir), epochs=1, lr=1e-2, warmup=1, max_grad_norm=0.5)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _worker(rank: int, world: int, port: int, output_dir: str, model_dir: str, weighting: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_ctx = init_distributed("cpu")
    torch.manual_seed(0)
    steps = [mbs[2 * rank : 2 * rank + 2] for mbs in global_steps(weighting)]
    cfg = config(output_dir, activation_checkpointing=True, save_every=STEPS, loss_weighting=weighting)
    model = load_for_training(model_dir, dist_ctx)  # meta, then rank 0 broadcasts
    assert model.lm_head.weight.is_meta
    trainer = Trainer(cfg, model, ListSampler(steps), dist_ctx)
    fill_shards(trainer.module, model_dir, dist_ctx)
    assert trainer.fit() == STEPS
    export_model(trainer, Config(train=cfg))
    shutdown(dist_ctx)


MODELS = {"llama": lambda seed=0: tiny_llama(tied=True, seed=seed),
          "gemma": lambda seed=0: tiny_gemma(seed=seed),
          "moe": lambda seed=0: tiny_moe(seed=seed)}


@pytest.mark.parametrize("weighting, family", [("token", "llama"), ("turn", "llama"), ("token", "gemma"),
                                               ("token", "moe")])
def test_two_fsdp_ranks_equal_one_process(tmp_path, weighting, family):
    os.environ["OMP_NUM_THREADS"] = "1"
    model_dir = save_pretrained(MODELS[family](), tmp_path / "model")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "fsdp"), str(model_dir), weighting), nprocs=2)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    sampler = ListSampler(global_steps(weighting))
    model = load_for_training(str(model_dir), init_distributed("cpu"))
    assert not model.lm_head.weight.is_meta
    single = Trainer(config(tmp_path / "single", loss_weighting=weighting), model, sampler,
                     init_distributed("cpu"))
    single.fit()

    def losses(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    a, b = losses("fsdp"), losses("single")
    assert len(a) == len(b) == STEPS
    for ra, rb in zip(a, b, strict=False):
        assert (ra["tokens"], ra["label_tokens"]) == (rb["tokens"], rb["label_tokens"])
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * rb["loss"]
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5 * rb["grad_norm"]
        for key in ("router_aux_loss", "router_load_min", "router_load_max"):  # MoE: the routers' step
            assert (key in ra) == (family == "moe") and abs(ra.get(key, 0) - rb.get(key, 0)) <= 1e-5
    exported = load_pretrained(tmp_path / "fsdp" / "final").state_dict()
    reference = single.model.state_dict()
    assert exported.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=1e-5, msg=name)

    # The sharded checkpoint (each rank wrote its half) loads into one unsharded process.
    other_init = MODELS[family](seed=1)
    resumed = Trainer(config(tmp_path / "fsdp", loss_weighting=weighting), other_init, sampler,
                      init_distributed("cpu"))
    assert resumed.resume().name == f"step_{STEPS:08d}" and resumed.step == STEPS
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5, msg=name)
    moments = [resumed.optimizer.state[p]["exp_avg"] for p in resumed.model.parameters()]
    expected = [single.optimizer.state[p]["exp_avg"] for p in single.model.parameters()]
    for a, b in zip(moments, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
