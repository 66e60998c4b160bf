"""BLOOM / BLOOMZ (transformers' BloomForCausalLM), run by packtune's own BLOOM model
(engine/model/bloom.py): its own config keys (`n_layer`, `n_head`, `layer_norm_epsilon`, ...) and
defaults, ALiBi instead of RoPE, LayerNorms and biases everywhere, an ungated 4 x hidden GELU MLP.
Checkpoints saved from transformers' BloomModel (bigscience's bloom and bloomz repositories) leave
out the `transformer.` prefix, as transformers' `base_model_prefix` allows."""

from __future__ import annotations

from typing import Any

from packtune.errors import ModelError
from packtune.model.bloom import BloomForCausalLM
from packtune.model.config import ModelArgs
from packtune.model.families.decoder import REJECTED_KEYS
from packtune.model.families.family import Family, HFConfig, register

_ALIASES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embed": "hidden_size"}


def parse(c: HFConfig) -> ModelArgs:
    """`n_layer` / `n_head` (or their long names), `hidden_size` (or `n_embed`), an MLP of 4 x hidden,
    one kv head per head, ALiBi, no RoPE."""
    for key in ("hidden_dropout", "attention_dropout"):
        if c.get(key, 0.0):
            raise ModelError(f"{key}={c.get(key)} is not supported (only 0)")
    if c.get("slow_but_exact", False) and c.get("pretraining_tp", 1) > 1:
        raise ModelError(
            f"slow_but_exact with pretraining_tp={c.get('pretraining_tp')} is not supported (its sliced "
            "matmuls round differently; set slow_but_exact to false)")
    for key in REJECTED_KEYS:
        if c.raw.get(key):
            raise ModelError(f"config option {key!r} is not supported")
    shape = {long: c.required(short if short in c.raw else long) for short, long in _ALIASES.items()}
    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    if hidden % heads:
        raise ModelError(f"hidden_size={hidden} is not a multiple of n_head={heads}")
    return ModelArgs(
        model_type="bloom",
        vocab_size=c.required("vocab_size"),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=c.get("seq_length") or 2048,
        layer_norm_eps=float(c.get("layer_norm_epsilon")),
        tie_word_embeddings=bool(c.get("tie_word_embeddings")),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        hidden_act="bloom_gelu",
        alibi=True,
        residual_post_layernorm=bool(c.get("apply_residual_connection_post_layernorm", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
        initializer_range=float(c.get("initializer_range")),
        dtype=c.raw.get("dtype") or c.raw.get("torch_dtype"),
        hf_config=dict(c.raw),
    )


def write(args: ModelArgs) -> dict[str, Any]:
    """BloomConfig's own keys (n_layer, n_head, layer_norm_epsilon, ...); the original's others kept."""
    long_names = ("n_embed", "num_hidden_layers", "num_attention_heads")
    cfg = {k: v for k, v in args.hf_config.items() if k not in long_names}
    cfg.update(
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
    return cfg


def flops(args: ModelArgs, seq_len: int) -> int:
    """The decoders' count (families/decoder.py) over BLOOM's parameters: biases everywhere, LayerNorms
    with weight and bias, the embedding LayerNorm, an ungated GELU MLP."""
    h, i = args.hidden_size, args.intermediate_size
    layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
    params = args.num_hidden_layers * layer + 4 * h + args.vocab_size * h
    return 6 * params + 12 * args.num_hidden_layers * args.num_attention_heads * args.head_dim * seq_len


def stored(names: list[str]) -> dict[str, str]:
    """Model tensor name -> stored name: the `transformer.` prefix added back where a checkpoint
    saved from BloomModel left it out."""
    if any(name.startswith("transformer.") for name in names):
        return {name: name for name in names}
    return {(name if name == "lm_head.weight" else f"transformer.{name}"): name for name in names}


FAMILY = register(Family(
    model_type="bloom",
    architecture="BloomForCausalLM",
    parse=parse,
    write=write,
    build=BloomForCausalLM,
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    defaults={"layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": None, "tie_word_embeddings": True, "seq_length": 2048},
    flops=flops,
    hf_refusal="transformers' BLOOM forward cannot take packed input: it builds the ALiBi biases and the "
               "causal mask over the whole row (it reads no position_ids or cu_seqlens), so packed samples "
               "would attend to each other with biases that run across sample boundaries",
    stored=stored,
))
