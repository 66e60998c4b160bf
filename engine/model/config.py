"""Model shape and options, one `ModelArgs` for every family, read from a Hugging Face `config.json`.

Each field is an option of packtune's model that some family sets (the family files in
engine/model/families/ say which, parse config.json into these fields and write them back). Every
option that changes the model's math is either supported exactly or rejected with a ModelError that
names it: a config packtune cannot reproduce never loads as a silent approximation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packtune.errors import ModelError

if TYPE_CHECKING:
    from packtune.model.rope_config import RopeScaling


@dataclass
class ModelArgs:
    """Shapes and options of a causal LM (see each field for the families that set it)."""

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
    qk_norm: str | None = None
    """RMSNorm of q and k before RoPE: per head over head_dim ("head": Qwen3, Gemma 3) or over the
    whole projection ("projection": OLMo 2)."""
    hidden_act: str = "silu"
    """The MLP's activation: silu (SwiGLU), gelu_pytorch_tanh (GeGLU, Gemma) or bloom_gelu (BLOOM's
    ungated GELU, kernels/bloom_gelu.py)."""
    norm_offset: float = 0.0
    """RMSNorm scales by offset + weight: 0 (Llama), 1 (Gemma, whose weights are stored minus one)."""
    scale_embeddings: bool = False
    """Multiply the embeddings by sqrt(hidden_size), rounded to the weights' dtype (Gemma)."""
    norm_placement: str = "pre"
    """Where a block's RMSNorms stand: "pre" (on the attention and MLP inputs: Llama), "sandwich" (on
    their inputs and outputs: Gemma) or "post" (on their outputs only: OLMo 2)."""
    attention_scale: float | None = None
    """The attention logits' scale when it is not head_dim ** -0.5 (Gemma's query_pre_attn_scalar ** -0.5,
    Granite's attention_multiplier)."""
    embedding_multiplier: float = 1.0
    """The embeddings are multiplied by it (Granite)."""
    residual_multiplier: float = 1.0
    """Each block adds its attention and MLP outputs times it to the residual stream (Granite)."""
    logits_scaling: float = 1.0
    """The output logits are divided by it (Granite): packtune divides the final hidden states,
    which is the same product, so the fused loss needs no change."""
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
    clip_qkv: float | None = None
    """q, k and v clamped to [-clip_qkv, clip_qkv] after their projections and norms (OLMoE)."""
    attention_sinks: bool = False
    """A learned logit per query head in each softmax's denominator, attending to nothing (gpt-oss)."""
    num_experts: int = 0
    """Experts of each sparse MLP block (Qwen3-MoE, Mixtral, OLMoE, gpt-oss); 0: every block is dense.
    The sparse blocks and their router are engine/model/moe.py."""
    num_experts_per_tok: int = 0
    """The experts each token is routed to (top k)."""
    moe_intermediate_size: int = 0
    """Each expert's hidden width (Qwen3-MoE's `moe_intermediate_size`; the others' intermediate_size,
    which in Qwen3-MoE is the width of its dense layers)."""
    router: str = "softmax_topk"
    """How the router weights a token's experts: "softmax_topk" (softmax over every expert, then the top
    k, renormalised with norm_topk_prob: Qwen3-MoE, OLMoE, Mixtral) or "topk_softmax" (the top k
    logits, softmax over those: gpt-oss)."""
    norm_topk_prob: bool = False
    router_bias: bool = False
    """A bias on the router's logits (gpt-oss)."""
    expert_format: str = "swiglu"
    """The experts' stored layout and activation: "swiglu" (gate_up [E, 2I, H], down [E, H, I], SwiGLU)
    or "gpt_oss" (in-by-out, gate/up interleaved, biases, SwiGLU clamped at swiglu_limit)."""
    swiglu_alpha: float = 1.702
    """gpt-oss: the sigmoid's gain in its clamped SwiGLU."""
    swiglu_limit: float = 7.0
    """gpt-oss: the clamp of gate (above) and up (both sides)."""
    mlp_only_layers: tuple[int, ...] = ()
    """Layers whose MLP is dense although the model has experts (Qwen3-MoE)."""
    decoder_sparse_step: int = 1
    """Every this-many-th layer is sparse (Qwen3-MoE: layer i when (i + 1) % step == 0)."""
    router_aux_loss_coef: float = 0.0
    """The load-balancing loss's coefficient in config.json (`[train] router_aux_loss` uses it)."""
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
            raise ModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not self.alibi and (self.rotary_dim % 2 or self.rotary_dim <= 0):
            raise ModelError(
                f"head_dim={self.head_dim} x partial_rotary_factor={self.partial_rotary_factor} must give an "
                "even, positive rotary dimension"
            )
        scaling = self.rope_scaling
        if scaling is not None and scaling.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(scaling, name)) != self.rotary_dim // 2:
                    raise ModelError(
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

    def sparse(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is a block of experts (transformers' Qwen3-MoE rule; every layer
        for the other MoE families, whose step is 1 and mlp_only_layers empty)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def local_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates with the local (sliding-window) RoPE base."""
        return self.local_rope_theta is not None and self.window(layer) is not None

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at a sample length, as the family counts them
        (for MFU; see families/decoder.py for the decoders' count)."""
        from packtune.model.families import decoder_flops, family_for

        return (family_for(self.model_type).flops or decoder_flops)(self, seq_len)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Parse a config.json dict; unsupported model types or options raise ModelError."""
        from packtune.model.families import HFConfig, family_for

        family = family_for(cfg.get("model_type"))
        return family.parse(HFConfig(cfg, family.defaults))

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        """Read `config.json` (or a directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(
                f"{path}: no such file (a Hugging Face model directory needs config.json)"
            ) from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(cfg, dict):
            raise ModelError(f"{path}: expected a JSON object")
        try:
            return cls.from_hf_config(cfg)
        except ModelError as e:
            raise ModelError(f"{path}: {e}") from None

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers loads as this model (the original file's keys kept)."""
        from packtune.model.families import family_for

        family = family_for(self.model_type)
        cfg = family.write(self)
        cfg.update(architectures=[family.architecture], model_type=self.model_type)
        dtype = dtype or self.dtype
        if dtype is not None:
            cfg["torch_dtype"] = dtype
            cfg["dtype"] = dtype
        return cfg
