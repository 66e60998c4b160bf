"""BLOOM's ALiBi slopes reach every layer's attention in fp32 under FSDP2's bf16 mixed precision,
whose input casting rounds every floating-point forward input of a block (dataclass fields too)."""

import torch

from packtune.kernels import PackedLayout
from packtune.kernels.attention import alibi_head_slopes
from packtune.model import bloom
from packtune.model.config import ModelArgs
from packtune.parallel import init_distributed, parallelize, shutdown


def test_alibi_slopes_stay_fp32_under_fsdp2_bf16_input_casting(monkeypatch):
    args = ModelArgs.from_hf_config({"model_type": "bloom", "vocab_size": 64, "hidden_size": 48, "n_layer": 2,
                                     "n_head": 12})
    seen = []

    def attention(q, k, v, cu_seqlens, max_seqlen, *, alibi_slopes):
        seen.append(alibi_slopes)
        return torch.zeros_like(q)

    monkeypatch.setattr(bloom, "varlen_attention", attention)
    dist_ctx = init_distributed("cpu", mixed_precision=True)
    try:
        model = bloom.BloomForCausalLM(args)
        model.init_weights()
        parallelize(model, model.transformer.h, dist_ctx, mixed_precision=True)
        model(torch.arange(10), PackedLayout.packed([6, 4]))
    finally:
        shutdown(dist_ctx)
    assert len(seen) == 2
    for slopes in seen:  # 12 heads: slopes like 2^-(2/3), not representable in bf16
        assert slopes.dtype == torch.float32
        assert torch.equal(slopes, alibi_head_slopes(12))
