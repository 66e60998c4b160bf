"""packtune's kernels inside a Hugging Face transformers model: `apply_packtune(model)`.

For the transformers causal-LM classes of the families whose file in engine/model/families/ gives
`hf` (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3, OLMo 2; transformers 5.x); any
other model is refused by name, with the family's reason where it has one.
Only the forwards of *this model instance* change (an instance attribute shadows the class's
`forward`), nothing global: no module-level function, class or config is touched, so other
models in the process are unaffected and `undo()` deletes exactly what was set.

What each switch replaces:
- `fused_loss`: the causal LM head. In training with labels, the loss is packtune's fused linear
  masked cross-entropy on the final hidden states (the lm_head matmul inside, label rows only,
  never an N x V logits tensor); `outputs.logits` is None then, as with Liger's `skip_logits`.
  `num_items_in_batch` from the Trainer (the token count over the whole gradient-accumulation
  window and all ranks) is the denominator, so gradient accumulation is exact. Out of training
  (eval, generation) logits are computed as usual and the loss is packtune's masked CE on them.
- `rms_norm`, `swiglu`, `geglu`: the RMSNorm (Gemma's with 1 + weight) and gated MLP modules call
  packtune's kernels: SwiGLU for Llama, Mistral, Qwen and Phi-3 (its fused gate_up_proj split),
  tanh-GELU GeGLU for Gemma. Gemma's final-logit softcap is applied inside the fused loss.
- `rotary`: the attention modules rotate q and k with packtune's fused rotary kernel (the cos/sin
  the model computed, so every rope scaling type transformers supports rotates identically; Phi-3's
  longrope per sample, see hf_forwards.py).
- `packed`: a packed row (batch of one row holding several samples) attends only within each
  sample through packtune's `varlen_attention` (flash-attn / torch varlen on CUDA, exact SDPA over
  length buckets elsewhere). The samples are given by `cu_seqlens` (+ `max_seqlen`),
  as `PackedCollator` emits, or transformers' `cu_seq_lens_q`/`max_length_q`, or else found where
  `position_ids` restart. No T x T mask is built, and the label of each sample's last token is
  forced to -100 so no sample ever predicts the next one's first token. In a packed forward the
  decoder layers run from here (embed, rotary tables, layers, norm) rather than through the base
  model's forward, which would build a dense packed mask (or, with a cache, silently ignore the
  packing: transformers only detects packing from position_ids when no cache is passed).
- `lora` (a PEFT-wrapped model): PEFT's LoRA linears run packtune's fused LoRA linear on PEFT's
  own parameters where the layer is the plain case (peft_lora.py), and an MLP whose three
  projections are all LoRA runs the fused LoRA MLP (with `swiglu`).
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings
from collections.abc import Callable

import torch
from torch import nn

from packtune.errors import ModelError
from packtune.integrations.hf_forwards import (
    ForwardState,
    PacktuneOptions,
    attention_forward_for,
    causal_lm_forward_for,
    fused_swiglu_mlp_forward,
    geglu_mlp_forward,
    gemma_rms_norm_forward,
    rms_norm_forward,
    swiglu_mlp_forward,
)
from packtune.integrations.lm_head import HeadTransform
from packtune.integrations.peft_lora import (
    is_peft_lora_linear,
    is_peft_lora_mlp,
    peft_lora_linear_forward,
    peft_lora_mlp_forward_for,
)
from packtune.model.families import HFModules, families, family_for_architecture


class UnsupportedModelError(ModelError, TypeError):
    """apply_packtune was given a model whose forward it does not know how to replace exactly."""


class PacktuneHandle:
    """What `apply_packtune` changed; `undo()` restores the original forwards exactly."""

    def __init__(self, model: nn.Module, options: PacktuneOptions) -> None:
        self.model, self.options = model, options
        self._patched: list[tuple[nn.Module, object]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.forward_state = ForwardState()
        self.warned = False

    def patch(self, module: nn.Module, forward: Callable) -> None:
        """Shadow `module.forward` with `forward` bound to the module, remembering what was there."""
        self._patched.append((module, module.__dict__.get("forward")))
        module.forward = types.MethodType(forward, module)

    @property
    def active(self) -> bool:
        return getattr(self.model, "_packtune_handle", None) is self

    @property
    def patched_modules(self) -> int:
        return len(self._patched)

    def undo(self) -> None:
        if not self.active:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, previous in reversed(self._patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._patched.clear()
        del self.model._packtune_handle

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"PacktuneHandle({type(self.model).__name__}, {self.options}, {state})"


def apply_packtune(
    model: nn.Module,
    *,
    fused_loss: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    rotary: bool = True,
    packed: bool = True,
    lora: bool = True,
    geglu: bool = True,
) -> PacktuneHandle:
    """Route a transformers Llama/Mistral/Qwen2/Qwen3/Gemma 2/Gemma 3/Phi-3 causal LM through
    packtune's kernels (see module doc).

    Call it before building the Trainer (which inspects `model.forward` once). Returns a handle;
    `handle.undo()` or `remove_packtune(model)` restores the original forwards.

    A PEFT-wrapped model (`get_peft_model`, as TRL builds for LoRA) is patched inside: its
    transformers model gets the new forwards, PEFT's LoRA layers run packtune's fused LoRA kernels
    on their own parameters where they allow it (`lora`; PEFT's forward otherwise), and the handle
    is found through the wrapper (`remove_packtune(peft_model)`).
    """
    model = _unwrap_peft(model)
    spec = _modules(model)
    if fused_loss and type(model.lm_head) is not nn.Linear:
        raise UnsupportedModelError(
            f"apply_packtune(fused_loss=True): lm_head is a {type(model.lm_head).__name__} (an adapter on "
            "the LM head?), whose extra terms the fused loss would skip; pass fused_loss=False"
        )
    if getattr(model, "_packtune_handle", None) is not None:
        raise RuntimeError("apply_packtune: already applied to this model; call remove_packtune(model) first")
    options = PacktuneOptions(fused_loss, rms_norm, swiglu, rotary, packed, lora, geglu)
    gated = _check_config(model, spec, options)
    modeling = sys.modules[type(model).__module__]
    classes = {kind: getattr(modeling, f"{spec.prefix}{kind}") for kind in ("RMSNorm", "MLP", "Attention")}
    norm_forward = gemma_rms_norm_forward if spec.norm_offset == 1.0 else rms_norm_forward
    if spec.activation == "gelu_tanh":
        mlp_forward = geglu_mlp_forward
    else:
        mlp_forward = fused_swiglu_mlp_forward if spec.fused_projections else swiglu_mlp_forward
    handle = PacktuneHandle(model, options)
    for module in model.modules():
        kind = type(module)
        if kind is classes["RMSNorm"] and rms_norm:
            handle.patch(module, norm_forward)
        elif kind is classes["MLP"] and gated:
            if lora and is_peft_lora_mlp(module):
                handle.patch(module, peft_lora_mlp_forward_for(spec.activation, mlp_forward))
            else:
                handle.patch(module, mlp_forward)
        elif lora and is_peft_lora_linear(module):
            handle.patch(module, peft_lora_linear_forward)
        elif kind is classes["Attention"] and (rotary or packed):
            handle.patch(module, attention_forward_for(modeling, spec, options))
    if fused_loss or packed:
        handle.patch(model, causal_lm_forward_for(options, handle.forward_state, trl_head(model)))
        handle._hooks.append(model.model.norm.register_forward_hook(_bypass_check(handle)))
    model._packtune_handle = handle
    return handle


def trl_head(model: nn.Module) -> HeadTransform:
    """The logit transform of TRL's fused LM head when `model.forward` is the one TRL's
    `add_fused_lm_head` installed (the settings are bound in that forward's closure), so packtune's
    answer to `fused_lm_head=True` computes what TRL's would; the identity for any other forward. A
    TRL head whose settings cannot be read (another TRL version) is refused rather than guessed."""
    func = getattr(model.__dict__.get("forward"), "__func__", None)
    code = getattr(func, "__code__", None)  # TRL wraps it with functools.wraps: __name__ is "forward"
    if code is None or code.co_name != "_fused_forward":
        return HeadTransform()
    module = func.__globals__["__name__"]
    if not module.startswith("trl."):
        return HeadTransform()
    bound = inspect.getclosurevars(func).nonlocals
    names = ("temperature", "logit_scale", "cast_lm_head_to_fp32")
    if any(name not in bound for name in names):
        raise UnsupportedModelError(
            f"apply_packtune: cannot read {', '.join(names)} from the LM head TRL installed on "
            f"{type(model).__name__}.forward ({module}); this packtune answers TRL 1.x's head. "
            "Pass fused_loss=False and packed=False to leave TRL's head in place"
        )
    return HeadTransform(float(bound["temperature"]), float(bound["logit_scale"]),
                         bool(bound["cast_lm_head_to_fp32"]))


def _check_config(model: nn.Module, spec: HFModules, options: PacktuneOptions) -> bool:
    """Refuse what the switches cannot reproduce exactly; returns whether the MLPs get a kernel
    (`geglu` for a tanh-GELU family, `swiglu` for the others)."""
    config, name = model.config, type(model).__name__
    gelu = spec.activation == "gelu_tanh"
    switch, allowed = ("geglu", ("gelu_pytorch_tanh",)) if gelu else ("swiglu", ("silu", "swish"))
    activation = getattr(config, spec.activation_key)
    if getattr(options, switch) and activation not in allowed:
        raise UnsupportedModelError(
            f"apply_packtune({switch}=True): {name} uses {spec.activation_key}={activation!r}, not "
            f"{allowed[0]}; pass {switch}=False"
        )
    if options.packed and getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"apply_packtune(packed=True): {name} has use_bidirectional_attention=True; packed rows "
            "attend causally; pass packed=False"
        )
    if options.packed and config.attention_dropout:
        raise UnsupportedModelError(
            f"apply_packtune(packed=True): attention_dropout={config.attention_dropout} "
            "is not supported by varlen attention; set it to 0 or pass packed=False"
        )
    return getattr(options, switch)


def _bypass_check(handle: PacktuneHandle) -> Callable:
    """A hook on the final norm: a training forward that gets there outside packtune's causal-LM
    forward computes its loss elsewhere, so `fused_loss` / `packed` never run; warn once."""

    def hook(module: nn.Module, args, output) -> None:
        if handle.warned or handle.forward_state.inside or not (module.training and torch.is_grad_enabled()):
            return
        handle.warned = True
        switches = [name for name in ("fused_loss", "packed") if getattr(handle.options, name)]
        warnings.warn(
            f"apply_packtune: a training forward of {type(handle.model).__name__} ran without packtune's "
            f"causal-LM forward, so {' and '.join(switches)} did not run: something replaced "
            "model.forward after apply_packtune (TRL's SFTTrainer installs its own LM head in __init__). "
            "Call apply_packtune(trainer.model) after building the trainer.",
            stacklevel=2,
        )

    return hook


def remove_packtune(model: nn.Module) -> None:
    """Undo `apply_packtune(model)`; a no-op on a model it was never applied to."""
    handle = getattr(model, "_packtune_handle", None)
    if handle is not None:
        handle.undo()


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT PeftModel (itself when not wrapped)."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _modules(model: nn.Module) -> HFModules:
    """What to patch in `model`, from its family; a model of no family, or of one apply_packtune
    refuses, raises UnsupportedModelError saying why."""
    name = type(model).__name__
    ours = type(model).__module__.startswith("transformers.models.")
    family = family_for_architecture(name) if ours else None
    if family is None or family.hf is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        reason = (f": {family.hf_refusal} (`packtune train` runs it with packtune's own model)"
                  if family is not None and family.hf_refusal else "")
        supported = ", ".join(f.architecture for f in families() if f.hf is not None)
        raise UnsupportedModelError(
            f"apply_packtune: {name} (model_type={model_type!r}) is not supported{reason}; supported are "
            f"transformers' {supported}. Nothing was changed."
        )
    return family.hf
