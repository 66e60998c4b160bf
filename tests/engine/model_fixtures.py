"""Tiny random Hugging Face checkpoints, built and saved by transformers itself (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

# name -> (transformers config class name, kwargs): together they cover GQA, llama3 / linear / dynamic
# rope scaling, tied embeddings, Llama q/k/v/o and MLP biases, pad-token embedding, Mistral's sliding
# window (smaller than the test sequences) with an explicit head_dim, and Qwen2's q/k/v bias with
# sliding attention on its upper layer only; Llama 3.2's tied head with llama3 scaling; Qwen3's
# per-head q/k norms (GQA with an explicit head_dim and a window; MHA with tied head and biases);
# Gemma 2 (alternating windows, attention and final logit softcaps, query_pre_attn_scalar; GQA tied,
# MHA untied) and Gemma 3 (q/k norms, a local RoPE base, linear scaling on the global layers);
# Phi-3 (fused qkv_proj / gate_up_proj; GQA tied with partial rotary 0.75 and a window; MHA untied);
# Phi-3 longrope with a short original context (10) so that samples take either factor set (GQA with
# partial rotary and the default attention factor; MHA with a window and a given attention factor).
# BLOOM (ALiBi: 4 heads, a power of two, tied; 6 heads, not one, untied, with
# apply_residual_connection_post_layernorm); OLMo 2 (post-norm blocks, q/k norms over the whole
# projection, GQA, attention biases); Granite 3 (its four multipliers at Granite-3.0-2b's values but
# an attention multiplier unlike head_dim ** -0.5, GQA, tied, biases). Mixtures of experts: Qwen3-MoE
# (renormalised top 2 of 4, a window; and only layer 1 of 4 sparse, through decoder_sparse_step 2 and
# mlp_only_layers [3], top 3 of 6 not renormalised, biases, tied),
# Mixtral (top 2 of 4, a window), OLMoE (top 3 of 8, clip_qkv small enough to clip, biases), gpt-oss
# (sinks, alternating windows, YaRN with a short original context, a swiglu_limit small enough to
# clamp, router and expert biases).
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
    "llama32_tied": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=64,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "qwen3_gqa": (
        "Qwen3Config",
        dict(num_key_value_heads=2, head_dim=24, use_sliding_window=True, sliding_window=6,
             max_window_layers=1),
    ),
    "qwen3_tied": ("Qwen3Config", dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=True,
                                       attention_bias=True)),
    "gemma2": (
        "Gemma2Config",
        dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20, sliding_window=5,
             attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    ),
    "gemma2_mha": (
        "Gemma2Config",
        dict(num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
             tie_word_embeddings=False, attention_bias=True, attn_logit_softcapping=1.5,
             final_logit_softcapping=None),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            },
        ),
    ),
    "gemma3_mha": (
        "Gemma3TextConfig",
        dict(num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
             tie_word_embeddings=False, attention_bias=True),
    ),
    "phi3": (
        "Phi3Config",
        dict(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, sliding_window=5,
             tie_word_embeddings=True, original_max_position_embeddings=64,
             rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.75}),
    ),
    "phi3_mha": (
        "Phi3Config",
        dict(num_key_value_heads=4, pad_token_id=None, eos_token_id=2,
             rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    ),
    "phi3_longrope": (
        "Phi3Config",
        dict(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, max_position_embeddings=64,
             original_max_position_embeddings=10,
             rope_parameters={"rope_type": "longrope", "rope_theta": 1000.0, "partial_rotary_factor": 0.75,
                              "short_factor": [1.0, 1.2, 1.5, 1.9, 2.4, 3.0],
                              "long_factor": [1.3, 2.1, 3.4, 5.5, 8.9, 14.4]}),
    ),
    "phi3_longrope_mha": (
        "Phi3Config",
        dict(num_key_value_heads=4, pad_token_id=None, eos_token_id=2, max_position_embeddings=40,
             original_max_position_embeddings=10, sliding_window=5,
             rope_parameters={"rope_type": "longrope", "rope_theta": 500.0, "attention_factor": 1.25,
                              "short_factor": [1.0, 1.1, 1.2, 1.4, 1.6, 1.9, 2.2, 2.6],
                              "long_factor": [2.0, 3.0, 4.5, 6.0, 8.0, 11.0, 15.0, 20.0]}),
    ),
    "bloom": ("BloomConfig", dict(pad_token_id=3)),
    "bloom_6heads": (
        "BloomConfig",
        dict(num_attention_heads=6, hidden_size=48, tie_word_embeddings=False,
             apply_residual_connection_post_layernorm=True),
    ),
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=2, attention_bias=True, pad_token_id=1, eos_token_id=2,
                                  rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "granite": ("GraniteConfig", dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                                      mlp_bias=True, embedding_multiplier=12.0, residual_multiplier=0.22,
                                      attention_multiplier=0.0625, logits_scaling=8.0)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, use_sliding_window=True, sliding_window=6)),
    "qwen3_moe_dense": ("Qwen3MoeConfig", dict(
        num_hidden_layers=4, num_key_value_heads=4, head_dim=16, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[3], attention_bias=True,
        tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=6, intermediate_size=32, pad_token_id=0)),
    "olmoe": ("OlmoeConfig", dict(num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
                                  intermediate_size=32, clip_qkv=1.5, attention_bias=True, eos_token_id=2)),
    "gpt_oss": ("GptOssConfig", dict(
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
        sliding_window=5, swiglu_limit=1.0, max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "beta_fast": 8.0,
                         "original_max_position_embeddings": 16, "beta_slow": 1.0, "truncate": False})),
    "llama_dynamic": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            max_position_embeddings=16,
            rope_scaling=dict(rope_type="dynamic", factor=2.0),
        ),
    ),
}


def make_hf_model(name: str, seed: int = 0, vocab_size: int | None = None):
    """A transformers model with weights spread wide enough that every op moves the logits.

    `vocab_size` replaces TINY's (600 matches data_fixtures' sentencepiece tokenizers)."""
    import transformers

    cls_name, kwargs = CONFIGS[name]
    tiny = TINY if vocab_size is None else {**TINY, "vocab_size": vocab_size}
    if cls_name == "BloomConfig":  # BLOOM's MLP is always 4 x hidden
        tiny = {k: v for k, v in tiny.items() if k != "intermediate_size"}
    config = getattr(transformers, cls_name)(**{**tiny, **kwargs})
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_hf_model(name: str, directory: Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    make_hf_model(name, seed, vocab_size).save_pretrained(directory)
    return directory


def model_type(name: str) -> str:
    """The `model_type` of fixture `name` (its transformers config class's)."""
    import transformers

    return getattr(transformers, CONFIGS[name][0]).model_type


def family_fixtures() -> dict[str, str]:
    """model_type -> the first fixture of that family, for every registered causal-LM family (the
    per-family tests run on these; a family without a fixture fails here, so a new family cannot go
    untested). The encoder-decoder families (T5) have theirs in t5_fixtures.py and their own tests."""
    from t5_fixtures import t5_model_types

    from packtune.model.families import families

    first: dict[str, str] = {}
    for name in CONFIGS:
        first.setdefault(model_type(name), name)
    causal = [f.model_type for f in families() if not f.encoder_decoder]
    missing = [t for t in causal if t not in first]
    missing += [f.model_type for f in families()
                if f.encoder_decoder and f.model_type not in t5_model_types()]
    assert not missing, f"no model_fixtures.CONFIGS / t5_fixtures.T5_CONFIGS entry for the families {missing}"
    return {t: first[t] for t in causal}
