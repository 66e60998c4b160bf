"""Model shape and options from a Hugging Face `config.json` (Llama 1/2/3/3.1, Mistral, Qwen2).

Every option that changes the model's math is either supported exactly or rejected with an error
that names it: a config we cannot reproduce never loads as a silent approximation. Defaults for
keys missing from the file are the ones transformers uses for that `model_type`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packtune.config import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# transformers' defaults for keys a config.json may omit, per model_type.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {
        "max_position_embeddings": 4096 * 32,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
    },
    "qwen2": {
        "max_position_embeddings": 32768,
        "bos_token_id": None,
        "eos_token_id": None,
        "num_key_value_heads": 32,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Keys whose presence means weights or math we do not reproduce.
_REJECTED_KEYS = ("quantization_config", "moe_intermediate_size", "num_local_experts", "num_experts")


class ModelConfigError(ConfigError):
    """A config.json this model cannot reproduce exactly; the message names the option."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (the `rope_scaling` / `rope_parameters` block of config.json)."""

    rope_type: str
    """linear, dynamic or llama3."""
    factor: float
    low_freq_factor: float = 1.0
    """llama3 only."""
    high_freq_factor: float = 4.0
    """llama3 only."""
    original_max_position_embeddings: int = 0
    """llama3 only: the pretraining context length."""


@dataclass
class ModelArgs:
    """Shapes and options of a Llama-family decoder."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """Bias on q/k/v projections (Llama attention_bias, always on for Qwen2)."""
    o_bias: bool = False
    """Bias on the output projection (Llama attention_bias only)."""
    mlp_bias: bool = False
    sliding_window: int | None = None
    """Keys a query sees, itself included (Hugging Face semantics), on the layers that slide."""
    layer_types: tuple[str, ...] = ()
    """Per layer "full_attention" or "sliding_attention"; empty: every layer slides if a window is set."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    """Standard deviation of the normal init used when training from scratch."""
    dtype: str | None = None
    """The checkpoint's stored dtype as config.json names it (e.g. "bfloat16")."""
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The original config.json, written back (updated) on export so no unknown key is lost."""

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as torchtitan counts them for MFU.

        6 x the parameters a token passes through (all but the embedding table; lm_head counted
        even when tied to it) plus 12 x layers x heads x head_dim x seq_len for attention scores
        and values (the causal half is not discounted, as in torchtitan and PaLM).
        """
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q_dim, kv_dim = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q_dim + 2 * kv_dim) + q_dim * h
        attn += (q_dim + 2 * kv_dim) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        params = self.num_hidden_layers * (attn + mlp + 2 * h) + h + self.vocab_size * h
        return 6 * params + 12 * self.num_hidden_layers * q_dim * seq_len

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Parse a config.json dict; unsupported model types or options raise ModelConfigError."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        get = _getter(cfg, _DEFAULTS[model_type])
        for key in _REJECTED_KEYS:
            if cfg.get(key):
                raise ModelConfigError(f"config option {key!r} is not supported")
        if get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act={get('hidden_act')!r} is not supported (only 'silu')")
        if get("attention_dropout", 0.0):
            raise ModelConfigError(f"attention_dropout={get('attention_dropout')} is not supported (only 0)")

        heads = _required(cfg, "num_attention_heads")
        hidden = _required(cfg, "hidden_size")
        rope_theta, rope_scaling = _parse_rope(cfg, get("max_position_embeddings"))
        sliding_window, layer_types = _parse_sliding_window(
            cfg, model_type, get, _required(cfg, "num_hidden_layers")
        )
        llama_bias = model_type == "llama" and bool(get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=_required(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required(cfg, "intermediate_size"),
            num_hidden_layers=_required(cfg, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", heads) or heads,
            head_dim=get("head_dim") or hidden // heads,
            max_position_embeddings=get("max_position_embeddings"),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or llama_bias,
            o_bias=llama_bias,
            mlp_bias=model_type == "llama" and bool(get("mlp_bias", False)),
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            pad_token_id=get("pad_token_id"),
            initializer_range=float(get("initializer_range", 0.02)),
            dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            hf_config=dict(cfg),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        """Read `config.json` (or a directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelConfigError(
                f"{path}: no such file (a Hugging Face model directory needs config.json)"
            ) from None
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(cfg, dict):
            raise ModelConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_hf_config(cfg)
        except ModelConfigError as e:
            raise ModelConfigError(f"{path}: {e}") from None

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers loads as this model (original keys kept)."""
        cfg = dict(self.hf_config)
        cfg.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act="silu",
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
        )
        if self.model_type == "llama":
            cfg.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            cfg["use_sliding_window"] = self.sliding_window is not None
            cfg["sliding_window"] = self.sliding_window
            if self.layer_types:
                cfg["layer_types"] = list(self.layer_types)
        scaling = None
        if self.rope_scaling is not None:
            scaling = {"rope_type": self.rope_scaling.rope_type, "factor": self.rope_scaling.factor}
            if self.rope_scaling.rope_type == "llama3":
                scaling.update(
                    low_freq_factor=self.rope_scaling.low_freq_factor,
                    high_freq_factor=self.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
                )
        if "rope_parameters" in cfg:  # transformers >= 5 layout: one block holding theta too
            cfg["rope_parameters"] = {
                "rope_type": "default",
                **(scaling or {}),
                "rope_theta": self.rope_theta,
            }
            cfg.pop("rope_scaling", None)
            cfg.pop("rope_theta", None)
        else:  # the layout every transformers version reads
            cfg.update(rope_theta=self.rope_theta, rope_scaling=scaling)
        dtype = dtype or self.dtype
        if dtype is not None:
            cfg["torch_dtype"] = dtype
            cfg["dtype"] = dtype
        return cfg


def _getter(cfg: dict[str, Any], defaults: dict[str, Any]):
    def get(key: str, default: Any = None) -> Any:
        if key in cfg:
            return cfg[key]
        return defaults.get(key, default)

    return get


def _required(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _parse_rope(cfg: dict[str, Any], max_positions: int) -> tuple[float, RopeScaling | None]:
    """Both layouts: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (5)."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelConfigError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ModelConfigError(f"rope scaling {rope_type!r} needs factor >= 1, got {factor!r}")
    if rope_type != "llama3":
        return theta, RopeScaling(rope_type, float(factor))
    original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    return theta, RopeScaling(
        "llama3",
        float(factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original or max_positions),
    )


def _parse_sliding_window(cfg: dict[str, Any], model_type: str, get, layers: int) -> tuple[int | None, tuple]:
    if model_type == "llama":
        return None, ()
    layer_types = cfg.get("layer_types")
    if model_type == "mistral":
        if layer_types:
            raise ModelConfigError("layer_types on a mistral config (alternating attention) is not supported")
        return get("sliding_window"), ()
    window = get("sliding_window") if get("use_sliding_window", False) else None
    if layer_types is None:
        start = get("max_window_layers")
        layer_types = [
            "sliding_attention" if window and i >= start else "full_attention" for i in range(layers)
        ]
    bad = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if bad or len(layer_types) != layers:
        raise ModelConfigError(
            f"layer_types must list {layers} of full_attention/sliding_attention, got {bad or layer_types}"
        )
    return window, tuple(layer_types)
