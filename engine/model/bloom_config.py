"""BLOOM's config.json (transformers' BloomConfig) to and from `ModelArgs`: its own key names
(`n_layer`, `n_head`, `layer_norm_epsilon`, ...) and defaults, apart from the Llama family's."""

from __future__ import annotations

from typing import Any

from packtune.model.config import (
    _ARCHITECTURES,
    _REJECTED_KEYS,
    ModelArgs,
    ModelConfigError,
    _getter,
    _required,
)

_BLOOM_DEFAULTS = {"layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": 1,
                   "eos_token_id": 2, "pad_token_id": None, "tie_word_embeddings": True, "seq_length": 2048}


def parse_bloom(cls: type[ModelArgs], cfg: dict[str, Any]) -> ModelArgs:
    """BLOOM / BLOOMZ (transformers' BloomConfig): `n_layer` / `n_head` (or their long names),
    `hidden_size` (or `n_embed`), an MLP of 4 x hidden, one kv head per head, ALiBi, no RoPE."""
    get = _getter(cfg, _BLOOM_DEFAULTS)
    for key in ("hidden_dropout", "attention_dropout"):
        if get(key, 0.0):
            raise ModelConfigError(f"{key}={get(key)} is not supported (only 0)")
    if get("slow_but_exact", False) and get("pretraining_tp", 1) > 1:
        raise ModelConfigError(
            f"slow_but_exact with pretraining_tp={get('pretraining_tp')} is not supported (its sliced "
            "matmuls round differently; set slow_but_exact to false)")
    for key in _REJECTED_KEYS:
        if cfg.get(key):
            raise ModelConfigError(f"config option {key!r} is not supported")
    aliases = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embed": "hidden_size"}
    shape = {long: _required(cfg, short if short in cfg else long) for short, long in aliases.items()}
    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    if hidden % heads:
        raise ModelConfigError(f"hidden_size={hidden} is not a multiple of n_head={heads}")
    return cls(
        model_type="bloom",
        vocab_size=_required(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=get("seq_length") or 2048,
        layer_norm_eps=float(get("layer_norm_epsilon")),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        hidden_act="bloom_gelu",
        alibi=True,
        residual_post_layernorm=bool(get("apply_residual_connection_post_layernorm", False)),
        bos_token_id=get("bos_token_id"),
        eos_token_id=get("eos_token_id"),
        pad_token_id=get("pad_token_id"),
        initializer_range=float(get("initializer_range")),
        dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        hf_config=dict(cfg),
    )


def bloom_hf_config(args: ModelArgs, dtype: str | None) -> dict[str, Any]:
    """BloomConfig's own keys (n_layer, n_head, layer_norm_epsilon, ...); the original's others kept."""
    aliases = ("n_embed", "num_hidden_layers", "num_attention_heads")
    cfg = {k: v for k, v in args.hf_config.items() if k not in aliases}
    cfg.update(
        architectures=[_ARCHITECTURES["bloom"]],
        model_type="bloom",
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        n_layer=args.num_hidden_layers,
        n_head=args.num_attention_heads,
        layer_norm_epsilon=args.layer_norm_eps,
        apply_residual_connection_post_layernorm=args.residual_post_layernorm,
        tie_word_embeddings=args.tie_word_embeddings,
        bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id,
        pad_token_id=args.pad_token_id,
        initializer_range=args.initializer_range,
    )
    dtype = dtype or args.dtype
    if dtype is not None:
        cfg["torch_dtype"] = dtype
        cfg["dtype"] = dtype
    return cfg
