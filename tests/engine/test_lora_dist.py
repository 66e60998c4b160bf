"""LoRA and QLoRA under FSDP2: two gloo ranks (meta model, rank 0 broadcasting base and initial
adapters, every rank quantising an NF4 base itself, activation checkpointing) train exactly like
one process; only adapters are in the optimizer and the checkpoint, the exported adapter is the
same, and the sharded checkpoint resumes in one process."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from test_train_dist import config, free_port, global_steps
from toy_training import ListSampler, tiny_llama, tiny_moe

from packtune.config import Config, LoRAConfig
from packtune.export import export_model
from packtune.lora import merged_state_dict, read_adapter
from packtune.lora.apply import base_bytes
from packtune.lora.sharded_nf4 import nf4_weights
from packtune.lora.training import lora_preparer, lora_summary
from packtune.model.hf_io import load_pretrained, save_pretrained
from packtune.model.loading import fill_shards, load_for_training
from packtune.parallel import init_distributed, shutdown
from packtune.train import Trainer

STEPS = 5
TARGETS = {"llama": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
           "moe": ["q_proj", "v_proj", "experts.gate_up_proj", "experts.down_proj"]}
ADAPTED = {"llama": 2 * 5, "moe": 3 * 2 + 2 * 2}
"""Adapted weights: 2 layers x 5 linears; 3 layers x 2 attention linears + 2 sparse x 2 expert weights."""
# QLoRA: FSDP shards NF4 weights only evenly, so every layer needs >= 2 groups of 256 scale blocks
NF4_DIMS = {"llama": dict(hidden_size=256, intermediate_size=512, head_dim=64),
            "moe": dict(hidden_size=256, intermediate_size=512, head_dim=64, moe_intermediate_size=64)}
MODELS = {"llama": lambda **dims: tiny_llama(tied=True, **dims),
          "moe": lambda **dims: tiny_moe(vocab=38, **dims)}  # even rows: the shards hold half the base


def run_config(output_dir, base_dtype: str, family: str = "llama", **overrides) -> Config:
    lora = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS[family], base_dtype=base_dtype)
    return Config(train=config(output_dir, **overrides), lora=lora)


def _worker(rank: int, world: int, port: int, output_dir: str, model_dir: str, base_dtype: str,
            family: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_ctx = init_distributed("cpu")
    torch.manual_seed(0)
    steps = [mbs[2 * rank : 2 * rank + 2] for mbs in global_steps("token")]
    cfg = run_config(output_dir, base_dtype, family, activation_checkpointing=True, save_every=STEPS,
                     export="both")
    prepare = lora_preparer(cfg, dist_ctx.device, sharded=True)
    model = load_for_training(model_dir, dist_ctx, prepare)
    whole_base = base_bytes(model)
    trainer = Trainer(cfg.train, model, ListSampler(steps), dist_ctx)
    fill_shards(trainer.module, model_dir, dist_ctx, prepare)
    assert bool(nf4_weights(trainer.module)) == (base_dtype == "nf4")
    # each rank holds half the base (plus an odd row, or NF4's replicated lookup table and mean)
    assert abs(base_bytes(model) - whole_base / 2) <= 1024
    line = lora_summary(cfg, model, dist_ctx.device, whole_base, world)
    name = "nf4" if base_dtype == "nf4" else "float32"
    assert (f"frozen base {whole_base / 2**20:.1f} MiB ({name}) in all, {base_bytes(model) / 2**20:.1f} MiB "
            f"on rank {rank} (sharded over 2 ranks)") in line
    assert trainer.fit() == STEPS
    export_model(trainer, cfg)
    shutdown(dist_ctx)


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype, family", [("auto", "llama"), ("nf4", "llama"), ("nf4", "moe")])
def test_two_fsdp_ranks_equal_one_process_with_lora(tmp_path, base_dtype, family):
    """A mixture of experts too: NF4 expert weights (2-D, sharded by expert rows) under QLoRA."""
    if base_dtype == "nf4":
        pytest.importorskip("torchao")
    os.environ["OMP_NUM_THREADS"] = "1"
    model = MODELS[family](**(NF4_DIMS[family] if base_dtype == "nf4" else {}))
    model_dir = save_pretrained(model, tmp_path / "model")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "fsdp"), str(model_dir), base_dtype, family),
             nprocs=2)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist_ctx = init_distributed("cpu")
    cfg = run_config(tmp_path / "single", base_dtype, family)
    prepare = lora_preparer(cfg, dist_ctx.device, sharded=False)
    model = load_for_training(str(model_dir), dist_ctx, prepare)
    single = Trainer(cfg.train, model, ListSampler(global_steps("token")), dist_ctx)
    trainable = [p for p in single.model.parameters() if p.requires_grad]
    optimized = sum(len(g["params"]) for g in single.optimizer.param_groups)
    assert optimized == len(trainable) == 2 * ADAPTED[family]
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
    # the merged export gathers the base from the shards (an NF4 base dequantised): the same model
    merged = load_pretrained(tmp_path / "fsdp" / "final-merged").state_dict()
    expected = merged_state_dict(single.model, single.model.state_dict())
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value.float(), rtol=0, atol=1e-5, msg=name)

    prepare = lora_preparer(cfg, dist_ctx.device, sharded=False)
    resumed_model = load_for_training(str(model_dir), dist_ctx, prepare)
    resumed = Trainer(config(tmp_path / "fsdp"), resumed_model, ListSampler(global_steps("token")), dist_ctx)
    assert resumed.resume().name == f"step_{STEPS:08d}"
    for name, value in resumed.model.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5, msg=name)
