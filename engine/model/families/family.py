"""What a model family is to packtune, and the registry that finds one by config.json's `model_type`.

A family is one file in this folder. It says how its config.json reads into `ModelArgs` (and is
written back), which of packtune's model classes runs it (a causal LM, or an encoder-decoder: T5),
the names of its blocks' linears (what LoRA targets), and what `apply_packtune` patches in
transformers' own implementation of it, or why it refuses. Everything else in packtune asks the
registry; no other file compares `model_type` strings.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packtune.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from packtune.model.config import ModelArgs


class HFConfig:
    """A config.json dict read with transformers' defaults for the keys it omits."""

    def __init__(self, cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
        self.raw, self.defaults = cfg, defaults

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.raw:
            return self.raw[key]
        return self.defaults.get(key, default)

    def required(self, key: str) -> int:
        """A positive integer the file must hold (a shape)."""
        value = self.raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelError(f"{key} must be a positive integer, got {value!r}")
        return value

    def optional_float(self, key: str) -> float | None:
        value = self.get(key)
        return None if value is None else float(value)


@dataclass(frozen=True)
class HFModules:
    """How `apply_packtune` routes transformers' implementation of a family through packtune's kernels:
    it replaces the forwards of the modeling module's `{prefix}RMSNorm`, `{prefix}MLP` and
    `{prefix}Attention` instances (integrations/hf_forwards.py)."""

    prefix: str
    """The class-name prefix in transformers' modeling module ("Llama": LlamaRMSNorm, ...)."""
    activation: str = "silu"
    """The gated MLP's activation: silu (SwiGLU) or gelu_tanh (GeGLU)."""
    activation_key: str = "hidden_act"
    """The config attribute naming it (Gemma's `hidden_activation`)."""
    norm_offset: float = 0.0
    """RMSNorm scales by offset + weight (Gemma: 1)."""
    fused_projections: bool = False
    """q/k/v in one `qkv_proj`, gate/up in one `gate_up_proj` (Phi-3)."""
    qk_norm: str | None = None
    """q and k normed before RoPE: per head ("head": Qwen3, Gemma 3) or over the whole projection
    ("projection": OLMo 2)."""
    attention_softcap: bool = False
    """Attention logits capped by the module's `attn_logit_softcapping` (Gemma 2)."""
    window_per_layer: bool = True
    """Each attention module's own `sliding_window` (None on full layers); False: the config's window
    on every layer (Mistral, Phi-3)."""


@dataclass(frozen=True)
class StoredTensor:
    """A model tensor a checkpoint keeps in pieces: per-expert matrices stacked into one 3-D tensor,
    MXFP4 blocks and scales dequantised. hf_io checks the pieces' names and the joined shape before it
    reads anything, then reads the pieces and joins them."""

    names: tuple[str, ...]
    """The stored tensors, in the order `join` takes them."""
    join: Callable[[list[torch.Tensor]], torch.Tensor]
    """The model's tensor from the pieces."""
    shape: Callable[[list[tuple[int, ...]]], tuple[int, ...]]
    """The joined tensor's shape from the pieces' shapes."""


@dataclass(frozen=True)
class Family:
    """One model family: everything about it that differs from the others."""

    model_type: str
    """config.json's `model_type`, the registry key."""
    architecture: str
    """transformers' class (a causal LM, or T5's conditional generation), written to config.json's
    `architectures`."""
    parse: Callable[[HFConfig], ModelArgs]
    """config.json -> ModelArgs; an option it cannot reproduce exactly raises ModelError naming it."""
    write: Callable[[ModelArgs], dict[str, Any]]
    """ModelArgs -> config.json (the original file's other keys kept) that transformers loads."""
    build: Callable[[ModelArgs], nn.Module]
    """packtune's model for these args, on the current default device, weights uninitialised: a
    `CausalLM`, or for an encoder-decoder (`encoder_decoder`) a `T5ForConditionalGeneration`."""
    lora_targets: tuple[str, ...]
    """The names of a block's linears, in block order (LoRA's possible targets, as PEFT names them)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """transformers' defaults for keys a config.json of this family may omit."""
    flops: Callable[[ModelArgs, int], int] | None = None
    """Training FLOPs per token at a sample length; None: the shared decoder's count."""
    hf: HFModules | None = None
    """What apply_packtune patches in transformers' implementation; None: it refuses (`hf_refusal`)."""
    hf_refusal: str = ""
    """Why apply_packtune refuses this family (where packtune's own model still trains it)."""
    stored: Callable[[list[str]], Mapping[str, str | StoredTensor]] | None = None
    """Where a checkpoint keeps the model's tensors, given its stored names: model tensor name -> its
    stored name, or the pieces it is joined from (`StoredTensor`); a name left out is stored as
    itself. None: every tensor under its own name."""
    unread_names: tuple[str, ...] = ()
    """Stored tensors the model does not read (T5: the copies of the shared embedding in each stack, the
    decoder's unused cross-attention bias table): neither loaded nor reported as unexpected."""
    checkpoint_args: Callable[[ModelArgs, Collection[str]], ModelArgs] | None = None
    """The args completed by the names a checkpoint stores (T5: its head is tied exactly when no
    `lm_head.weight` is stored, whatever config.json says); None: config.json alone decides."""
    encoder_decoder: bool = False
    """Trained on (input, target) pairs through an encoder and a decoder (T5), not as a causal LM: its
    data are pairs (data/pairs.py), packed on both sides (data/pair_rows.py)."""
    loss: Callable[[nn.Module], nn.Module] | None = None
    """The training loss module wrapping the model (FSDP's root); None: `CausalLMLoss` (engine/loss.py)."""
    generate: Callable[..., list[list[int]]] | None = None
    """Batched generation, `generate_batch`'s signature (model/generate.py); None: `generate_batch`."""
    peft_task_type: str = "CAUSAL_LM"
    """PEFT's `task_type` written into an exported adapter's config."""


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.model_type in _REGISTRY:
        raise ValueError(f"model family {family.model_type!r} is registered twice")
    _REGISTRY[family.model_type] = family
    return family


def model_types() -> tuple[str, ...]:
    """Every registered `model_type`, in registration order."""
    return tuple(_REGISTRY)


def families() -> tuple[Family, ...]:
    return tuple(_REGISTRY.values())


def lora_target_names() -> tuple[str, ...]:
    """Every projection name a registered family's blocks have (`lora.targets` may name these)."""
    return tuple(dict.fromkeys(name for family in _REGISTRY.values() for name in family.lora_targets))


def family_for(model_type: Any) -> Family:
    """The family of config.json's `model_type`; an unknown one raises ModelError listing the known."""
    found = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if found is None:
        raise ModelError(f"model_type {model_type!r} is not supported (supported: {', '.join(_REGISTRY)})")
    return found


def family_for_architecture(name: str) -> Family | None:
    """The family whose transformers causal-LM class is `name`, if any."""
    return next((f for f in _REGISTRY.values() if f.architecture == name), None)


def encoder_decoder(model: nn.Module) -> bool:
    """Whether `model` (packtune's, with `args`) is an encoder-decoder: it reads prompts and trains on
    pairs as `Family.encoder_decoder` says."""
    return family_for(model.args.model_type).encoder_decoder


def build_model(args: ModelArgs) -> nn.Module:
    """packtune's model for `args` (on the current default device), weights uninitialised."""
    return family_for(args.model_type).build(args)
