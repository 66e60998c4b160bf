"""Tiny random T5 checkpoints, built and saved by transformers itself (no download).

The four kinds transformers 5 makes between tied and untied heads and scaled and unscaled decoder
outputs: T5 v1.1 / FLAN-T5 (gated-GELU, its own head, no scaling), the original T5 (ReLU, tied head,
scaled), mT5 (gated-GELU, its own head) and mT5 with a tied head (never scaled). Each has fewer encoder
than decoder layers, an attention width (heads x d_kv = 48) unlike d_model (64), and a bias of 8
buckets up to distance 20, so the test rows reach the logarithmic buckets and the shared last one.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_T5 = dict(vocab_size=96, d_model=64, d_kv=12, d_ff=80, num_layers=2, num_decoder_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)

# name -> (transformers config class name, kwargs, an own lm_head)
T5_CONFIGS = {
    "t5_v11": ("T5Config", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), True),
    "t5_original": ("T5Config", dict(feed_forward_proj="relu"), False),
    "mt5": ("MT5Config", dict(), True),
    "mt5_tied": ("MT5Config", dict(), False),
}


def make_hf_t5(name: str, seed: int = 0, vocab_size: int | None = None):
    """A transformers T5 with weights spread wide enough that every op moves the logits (the bias
    tables by several units, so the buckets matter; the embeddings at T5's std of 1, so a tied and
    scaled head's greedy answers still depend on the prompt)."""
    import transformers

    cls_name, kwargs, own_head = T5_CONFIGS[name]
    tiny = TINY_T5 if vocab_size is None else {**TINY_T5, "vocab_size": vocab_size}
    config = getattr(transformers, cls_name)(**{**tiny, **kwargs})
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    if own_head:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layer_norm" in pname:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in pname:
                p.copy_(2.0 * torch.randn(p.shape, generator=gen))
            elif pname in ("shared.weight", "lm_head.weight"):  # T5's own init: std 1
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_hf_t5(name: str, directory: Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    make_hf_t5(name, seed, vocab_size).save_pretrained(directory)
    return directory


def t5_model_types() -> set[str]:
    """The `model_type`s the fixtures cover (their transformers config classes')."""
    import transformers

    return {getattr(transformers, cls_name).model_type for cls_name, _, _ in T5_CONFIGS.values()}
