"""What the families run by packtune's shared decoder (engine/model/llama.py) read and write alike:
the config.json keys every one of them names the same way, the sliding-window layouts, the options
none of them reproduces, and the FLOP count. A family file adds only what is its own."""

from __future__ import annotations

from typing import Any

from packtune.errors import ModelError
from packtune.model.config import ModelArgs
from packtune.model.families.family import HFConfig
from packtune.model.rope_config import parse_rope, whole_heads, write_rope

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""A decoder block's linears under transformers' Llama names, in block order (LoRA's targets)."""
REJECTED_KEYS = ("quantization_config", "moe_intermediate_size", "num_local_experts", "num_experts")
"""Keys whose presence means weights or math the dense decoder does not reproduce."""
LAYER_TYPES = ("full_attention", "sliding_attention")


def check_options(c: HFConfig, model_type: str, activation_key: str = "hidden_act",
                  activations: tuple[str, ...] = ("silu",), allowed: tuple[str, ...] = ()) -> str:
    """Refuse what no decoder family here reproduces (quantised weights, experts, dropout,
    bidirectional attention, another activation) unless the family reads the key itself
    (`allowed`: the MoE families' expert keys); returns the activation."""
    for key in REJECTED_KEYS:
        if c.raw.get(key) and key not in allowed:
            raise ModelError(f"config option {key!r} is not supported")
    for key in ("resid_pdrop", "embd_pdrop", "attention_dropout"):  # packtune trains without dropout
        if c.get(key, 0.0):
            raise ModelError(f"{key}={c.get(key)} is not supported (only 0)")
    if c.get("use_bidirectional_attention", False):
        raise ModelError("use_bidirectional_attention is not supported (causal decoders only)")
    activation = c.get(activation_key, "silu")
    if activation not in activations:
        raise ModelError(f"{activation_key}={activation!r} is not supported for {model_type}")
    return activation


def decoder_args(c: HFConfig, model_type: str, **options: Any) -> ModelArgs:
    """ModelArgs from the keys every decoder family names alike, then the family's `options` (its
    flags and whatever it parsed itself; RoPE is read here unless the family passed `rope_theta`)."""
    heads, hidden = c.required("num_attention_heads"), c.required("hidden_size")
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=c.required("vocab_size"),
        hidden_size=hidden,
        intermediate_size=c.required("intermediate_size"),
        num_hidden_layers=c.required("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads", heads) or heads,
        head_dim=c.get("head_dim") or hidden // heads,
        max_position_embeddings=c.get("max_position_embeddings"),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
        initializer_range=float(c.get("initializer_range", 0.02)),
        dtype=c.raw.get("dtype") or c.raw.get("torch_dtype"),
        hf_config=dict(c.raw),
    )
    if "rope_theta" not in options:
        whole_heads(c.raw, model_type)
        rope = {"rope_theta": c.get("rope_theta", 10000.0), **c.raw}  # the family's default base
        fields["rope_theta"], fields["rope_scaling"] = parse_rope(rope, c.get("max_position_embeddings"))
    fields.update(options)
    return ModelArgs(**fields)


def decoder_config(args: ModelArgs, **keys: Any) -> dict[str, Any]:
    """config.json for `args`: the original file's keys, the shared ones and RoPE updated, then `keys`."""
    cfg = dict(args.hf_config)
    cfg.update(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.rms_norm_eps,
        tie_word_embeddings=args.tie_word_embeddings,
        bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id,
        pad_token_id=args.pad_token_id,
        initializer_range=args.initializer_range,
        hidden_act=args.hidden_act,
    )
    write_rope(args, cfg)
    cfg.update(keys)
    return cfg


def layer_types(raw: Any, layers: int) -> tuple[str, ...]:
    """config.json's `layer_types`, checked: one of full_attention / sliding_attention per layer."""
    bad = sorted(set(raw) - set(LAYER_TYPES))
    if bad or len(raw) != layers:
        raise ModelError(
            f"layer_types must list {layers} of full_attention/sliding_attention, got {bad or raw}")
    return tuple(raw)


def uniform_window(c: HFConfig, model_type: str) -> dict[str, Any]:
    """One window on every layer when `sliding_window` is set (Mistral, Phi-3)."""
    if c.raw.get("layer_types"):
        raise ModelError(f"layer_types on a {model_type} config (alternating attention) is not supported")
    return dict(sliding_window=c.get("sliding_window"), layer_types=())


def qwen_windows(c: HFConfig) -> dict[str, Any]:
    """Qwen2 / Qwen3: a window only with `use_sliding_window`, on the layers from `max_window_layers`
    on unless `layer_types` lists them."""
    window = c.get("sliding_window") if c.get("use_sliding_window", False) else None
    raw = c.raw.get("layer_types")
    layers = c.required("num_hidden_layers")
    if raw is None:
        start = c.get("max_window_layers")
        raw = ["sliding_attention" if window and i >= start else "full_attention" for i in range(layers)]
    return dict(sliding_window=window, layer_types=layer_types(raw, layers))


def decoder_flops(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), as torchtitan counts them for MFU.

    6 x the parameters a token passes through (all but the embedding table; lm_head counted even
    when tied to it) plus 12 x layers x heads x head_dim x seq_len for attention scores and values
    (the causal half is not discounted, as in torchtitan and PaLM).
    """
    h, d, i = args.hidden_size, args.head_dim, args.intermediate_size
    q_dim, kv_dim = args.num_attention_heads * d, args.num_key_value_heads * d
    attn = h * (q_dim + 2 * kv_dim) + q_dim * h
    qk_norm = {"head": 2 * d, "projection": q_dim + kv_dim}.get(args.qk_norm, 0)
    attn += (q_dim + 2 * kv_dim) * args.qkv_bias + h * args.o_bias + qk_norm
    mlp = 3 * h * i + (2 * i + h) * args.mlp_bias
    norms = {"pre": 2, "sandwich": 4, "post": 2}[args.norm_placement] * h
    params = args.num_hidden_layers * (attn + mlp + norms) + h + args.vocab_size * h
    return 6 * params + 12 * args.num_hidden_layers * q_dim * seq_len
