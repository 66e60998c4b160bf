"""Long rows on the GPU: Trainer steps with activation checkpointing, a tiled MLP and activation
offload (block inputs in pinned host memory, brought back one ahead on the side stream) equal the
plain checkpointed steps in fp32, full fine-tuning and LoRA; the offload really moved bytes. On the
CPU the same comparison runs in tests/engine (test_tiled_mlp.py, test_offload.py); here the CUDA
side (copies on a side stream, events, record_stream) is what is checked. Skipped without CUDA."""

import io

import numpy as np
import pytest
import torch

from packtune.config import TrainConfig
from packtune.data.packing import build_packed_batch
from packtune.lora.apply import LoRASpec, apply_lora
from packtune.model.config import ModelArgs
from packtune.model.llama import LlamaForCausalLM
from packtune.parallel import init_distributed
from packtune.train import Trainer

pytestmark = pytest.mark.gpu
VOCAB = 1024
STEPS = 2


def row(seed: int, tokens: int = 3000, sample: int = 700):
    """One packed row of `sample`-token samples (the last shorter), the second half of each trained."""
    rng = np.random.default_rng(seed)
    lengths = [sample] * (tokens // sample) + ([tokens % sample] if tokens % sample else [])
    ids = rng.integers(0, VOCAB, tokens)
    trainable = np.concatenate([np.arange(n) >= n // 2 for n in lengths])
    return build_packed_batch(ids, ids, trainable, np.array(lengths))


def run(output_dir, lora: bool, **long_rows):
    """(loss, grad norm) of each of STEPS fp32 steps, and the trainer."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    model = LlamaForCausalLM(args)
    model.init_weights(torch.Generator().manual_seed(0))
    if lora:
        apply_lora(model, LoRASpec(8, 16.0), torch.float32)
    model = model.cuda()
    cfg = TrainConfig(output_dir=str(output_dir), max_steps=STEPS, lr=1e-3, progress="none", device="cuda",
                      activation_checkpointing=True, **long_rows)
    steps = [[row(s)] for s in range(STEPS)]
    trainer = Trainer(cfg, model, steps, init_distributed("cuda"), log_stream=io.StringIO(),
                      mixed_precision=False)
    for micro_batches in steps:
        trainer.train_step(micro_batches)
    return [(r["loss"], r["grad_norm"]) for r in trainer.metrics.flush()], trainer


@pytest.mark.parametrize("lora", [False, True])
def test_tiled_and_offloaded_steps_equal_plain_on_the_gpu(tmp_path, lora):
    plain, _ = run(tmp_path / "plain", lora)
    tiled, trainer = run(tmp_path / "tiled", lora, tiled_mlp=512, offload_activations=True)
    assert trainer.offload is not None and trainer.offload.offloaded_bytes > 0
    assert len(plain) == len(tiled) == STEPS
    torch.testing.assert_close(torch.tensor(tiled), torch.tensor(plain), rtol=1e-5, atol=0)
