"""Model shape and options from a Hugging Face `config.json` (Llama 1/2/3/3.x, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3 text, Phi-3 / Phi-4, BLOOM / BLOOMZ).

Every option that changes the model's math is either supported exactly or rejected with an error
that names it: a config we cannot reproduce never loads as a silent approximation. Defaults for
keys missing from the file are the ones transformers uses for that `model_type`. RoPE's keys are
read and written by rope_config.py, BLOOM's own config by bloom_config.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packtune.config import ConfigError

if TYPE_CHECKING:
    from packtune.model.rope_config import RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "bloom")
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")

# transformers' defaults for keys a config.json may omit, per model_type.
_GEMMA_DEFAULTS: dict[str, Any] = {
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
"""What Gemma2Config and Gemma3TextConfig share."""
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
    "qwen3": {
        "max_position_embeddings": 32768,
        "bos_token_id": None,
        "eos_token_id": None,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "gemma2": {
        **_GEMMA_DEFAULTS,
        "max_position_embeddings": 8192,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    "gemma3_text": {
        **_GEMMA_DEFAULTS,
        "max_position_embeddings": 131072,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "sliding_window_pattern": 6,
    },
    "phi3": {
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "pad_token_id": 32000,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
    },
}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "bloom": "BloomForCausalLM",
}
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "bloom_gelu")
"""silu: SwiGLU MLP; gelu_pytorch_tanh: GeGLU (tanh-approximated GELU); bloom_gelu: BLOOM's plain GELU MLP."""
# Keys whose presence means weights or math we do not reproduce.
_REJECTED_KEYS = ("quantization_config", "moe_intermediate_size", "num_local_experts", "num_experts")


class ModelConfigError(ConfigError):
    """A config.json this model cannot reproduce exactly; the message names the option."""


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
    """Bias on the output projection (Llama and Qwen3 attention_bias)."""
    mlp_bias: bool = False
    qk_norm: bool = False
    """Per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)."""
    hidden_act: str = "silu"
    """The MLP's activation: silu (SwiGLU), gelu_pytorch_tanh (GeGLU, Gemma) or bloom_gelu (BLOOM's
    ungated GELU, kernels/bloom_gelu.py)."""
    norm_offset: float = 0.0
    """RMSNorm scales by offset + weight: 0 (Llama), 1 (Gemma, whose weights are stored minus one)."""
    scale_embeddings: bool = False
    """Multiply the embeddings by sqrt(hidden_size), rounded to the weights' dtype (Gemma)."""
    sandwich_norms: bool = False
    """Gemma's four norms per layer: on the attention output and before and after the MLP."""
    query_pre_attn_scalar: int | float | None = None
    """Attention logits are scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5 (Gemma)."""
    attn_logit_softcapping: float | None = None
    """Attention logits capped as c * tanh(logits / c) (Gemma 2)."""
    final_logit_softcapping: float | None = None
    """Output logits capped as c * tanh(logits / c) (Gemma 2)."""
    partial_rotary_factor: float = 1.0
    """The leading fraction of each head's dims that rotates; the rest passes through (Phi-3 / Phi-4-mini)."""
    fused_projections: bool = False
    """q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj` (Phi-3's layout, kept on disk and in
    the model)."""
    alibi: bool = False
    """ALiBi attention biases instead of RoPE (BLOOM; see engine/model/bloom.py for its other parts)."""
    layer_norm_eps: float = 1e-5
    """BLOOM's LayerNorm epsilon (`layer_norm_epsilon`)."""
    residual_post_layernorm: bool = False
    """BLOOM's `apply_residual_connection_post_layernorm`: residual branches start from the normed input."""
    local_rope_theta: float | None = None
    """RoPE base of the sliding-window layers, unscaled (Gemma 3's rope_local_base_freq); None: rope_theta."""
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
        if not self.alibi and (self.rotary_dim % 2 or self.rotary_dim <= 0):
            raise ModelConfigError(
                f"head_dim={self.head_dim} x partial_rotary_factor={self.partial_rotary_factor} must give an "
                "even, positive rotary dimension"
            )
        scaling = self.rope_scaling
        if scaling is not None and scaling.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(scaling, name)) != self.rotary_dim // 2:
                    raise ModelConfigError(
                        f"longrope {name} has {len(getattr(scaling, name))} entries, expected "
                        f"{self.rotary_dim // 2} (rotary dimension {self.rotary_dim} / 2)"
                    )

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that RoPE rotates (transformers' int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def attention_scale(self) -> float | None:
        """The logit scale when it is not SDPA's default head_dim ** -0.5."""
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar**-0.5

    def local_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates with the local (sliding-window) RoPE base."""
        return self.local_rope_theta is not None and self.window(layer) is not None

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as torchtitan counts them for MFU.

        6 x the parameters a token passes through (all but the embedding table; lm_head counted
        even when tied to it) plus 12 x layers x heads x head_dim x seq_len for attention scores
        and values (the causal half is not discounted, as in torchtitan and PaLM).
        """
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q_dim, kv_dim = self.num_attention_heads * d, self.num_key_value_heads * d
        if self.model_type == "bloom":  # biases everywhere, LayerNorms (weight + bias), a GELU MLP
            layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
            params = self.num_hidden_layers * layer + 4 * h + self.vocab_size * h
            return 6 * params + 12 * self.num_hidden_layers * q_dim * seq_len
        attn = h * (q_dim + 2 * kv_dim) + q_dim * h
        attn += (q_dim + 2 * kv_dim) * self.qkv_bias + h * self.o_bias + 2 * d * self.qk_norm
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        norms = (4 if self.sandwich_norms else 2) * h
        params = self.num_hidden_layers * (attn + mlp + norms) + h + self.vocab_size * h
        return 6 * params + 12 * self.num_hidden_layers * q_dim * seq_len

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Parse a config.json dict; unsupported model types or options raise ModelConfigError."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if model_type == "bloom":
            from packtune.model.bloom_config import parse_bloom

            return parse_bloom(cls, cfg)
        from packtune.model import rope_config

        get = _getter(cfg, _DEFAULTS[model_type])
        for key in _REJECTED_KEYS:
            if cfg.get(key):
                raise ModelConfigError(f"config option {key!r} is not supported")
        for key in ("resid_pdrop", "embd_pdrop"):  # Phi-3's dropouts: packtune trains without dropout
            if get(key, 0.0):
                raise ModelConfigError(f"{key}={get(key)} is not supported (only 0)")
        gemma = model_type in GEMMA_MODEL_TYPES
        act_key = "hidden_activation" if gemma else "hidden_act"
        hidden_act = get(act_key, "silu")
        if hidden_act not in (("gelu_pytorch_tanh",) if gemma else ("silu",)):
            raise ModelConfigError(f"{act_key}={hidden_act!r} is not supported for {model_type}")
        if get("attention_dropout", 0.0):
            raise ModelConfigError(f"attention_dropout={get('attention_dropout')} is not supported (only 0)")
        if get("use_bidirectional_attention", False):
            raise ModelConfigError("use_bidirectional_attention is not supported (causal decoders only)")

        heads = _required(cfg, "num_attention_heads")
        hidden = _required(cfg, "hidden_size")
        layers = _required(cfg, "num_hidden_layers")
        local_rope_theta = None
        if model_type == "gemma3_text":
            rope_theta, rope_scaling, local_rope_theta = rope_config.parse_gemma3_rope(cfg, get)
        else:
            rope_theta, rope_scaling = rope_config.parse_rope(cfg, get("max_position_embeddings"), model_type)
        if gemma:
            sliding_window, layer_types = _parse_gemma_layers(cfg, model_type, get, layers)
        else:
            sliding_window, layer_types = _parse_sliding_window(cfg, model_type, get, layers)
        attention_bias = model_type in ("llama", "qwen3", *GEMMA_MODEL_TYPES)
        partial = rope_config.partial_rotary_factor(cfg, model_type)
        llama_bias = attention_bias and bool(get("attention_bias", False))
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
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            hidden_act=hidden_act,
            norm_offset=1.0 if gemma else 0.0,
            scale_embeddings=gemma,
            sandwich_norms=gemma,
            query_pre_attn_scalar=get("query_pre_attn_scalar") if gemma else None,
            attn_logit_softcapping=_optional_float(get("attn_logit_softcapping")),
            final_logit_softcapping=_optional_float(get("final_logit_softcapping")),
            partial_rotary_factor=partial,
            fused_projections=model_type == "phi3",
            local_rope_theta=local_rope_theta,
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
        if self.model_type == "bloom":
            from packtune.model.bloom_config import bloom_hf_config

            return bloom_hf_config(self, dtype)
        from packtune.model import rope_config

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
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
        )
        if self.model_type == "llama":
            cfg.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type in GEMMA_MODEL_TYPES:
            cfg.update(hidden_activation=self.hidden_act, attention_bias=self.qkv_bias,
                       query_pre_attn_scalar=self.query_pre_attn_scalar, sliding_window=self.sliding_window,
                       layer_types=list(self.layer_types), attn_logit_softcapping=self.attn_logit_softcapping,
                       final_logit_softcapping=self.final_logit_softcapping)
            cfg.pop("hidden_act", None)
        else:
            cfg["hidden_act"] = self.hidden_act
        if self.model_type == "qwen3":
            cfg["attention_bias"] = self.qkv_bias
        if self.model_type in ("mistral", "phi3"):
            cfg["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = self.sliding_window is not None
            cfg["sliding_window"] = self.sliding_window
            if self.layer_types:
                cfg["layer_types"] = list(self.layer_types)
        rope_config.write_rope(self, cfg)
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


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _parse_gemma_layers(cfg: dict[str, Any], model_type: str, get, layers: int) -> tuple[int, tuple]:
    """Gemma's window and per-layer attention types: Gemma 2 alternates local/global from layer 0;
    Gemma 3 has one global layer every `sliding_window_pattern` (5 local to 1 global)."""
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        period = 2 if model_type == "gemma2" else get("sliding_window_pattern")
        layer_types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    bad = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if bad or len(layer_types) != layers:
        raise ModelConfigError(
            f"layer_types must list {layers} of full_attention/sliding_attention, got {bad or layer_types}"
        )
    window = get("sliding_window")
    if window is None and "sliding_attention" in layer_types:
        raise ModelConfigError("sliding_window is required by layer_types with sliding_attention layers")
    return window, tuple(layer_types)


def _parse_sliding_window(cfg: dict[str, Any], model_type: str, get, layers: int) -> tuple[int | None, tuple]:
    if model_type == "llama":
        return None, ()
    layer_types = cfg.get("layer_types")
    if model_type in ("mistral", "phi3"):  # one window on every layer when set
        if layer_types:
            raise ModelConfigError(
                f"layer_types on a {model_type} config (alternating attention) is not supported")
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
