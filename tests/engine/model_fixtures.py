"""Tiny random Hugging Face checkpoints, built and saved by transformers itself (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

# name -> (transformers config class name, kwargs): together they cover GQA, llama3 / linear / dynamic
# rope scaling, tied embeddings, Llama q/k/v/o and MLP biases, pad-token embedding, Mistral's sliding
# window (smaller than the test sequences) with an explicit head_dim, and Qwen2's q/k/v bias with
# sliding attention on its upper layer only.
CONFIGS = {
    "llama3_gqa": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama_tied": (
        "LlamaConfig",
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            pad_token_id=0,
            rope_theta=500.0,
            rope_scaling=dict(rope_type="linear", factor=2.0),
        ),
    ),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=1, head_dim=24, sliding_window=6)),
    "qwen2": (
        "Qwen2Config",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
        ),
    ),
    "llama_dynamic": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            max_position_embeddings=16,
            rope_scaling=dict(rope_type="dynamic", factor=2.0),
        ),
    ),
}


def make_hf_model(name: str, seed: int = 0):
    """A transformers model with weights spread wide enough that every op moves the logits."""
    import transformers

    cls_name, kwargs = CONFIGS[name]
    config = getattr(transformers, cls_name)(**TINY, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_hf_model(name: str, directory: Path, seed: int = 0) -> Path:
    make_hf_model(name, seed).save_pretrained(directory)
    return directory
