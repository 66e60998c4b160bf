"""The forwards `apply_packtune` binds to a transformers model's modules (see transformers.py).

For a packed row (its `PackedLayout` from PackedCollator, or built from `cu_seqlens` / restarting
`position_ids`) they replace the forwards of transformers' implementation of a family (what
differs per family is its `HFModules`, engine/model/families/) with packtune's ops: varlen attention
instead of a mask (with the layer's sliding window, Gemma 2's logit softcap and the module's own
scale), packtune's rotary reading fp32 tables at the layout's positions (Gemma 3's local layers
their own tables, Phi-3's leading rotary dims only), q/k norms per head or over the projection,
RMSNorm (Gemma's with 1 + weight) and the gated MLP (SwiGLU, Phi-3's fused gate_up_proj, Gemma's
tanh-GELU GeGLU) as packtune kernels. Unpacked batches (padded with an attention mask, generation
with a cache) run transformers' own attention forward unchanged.
transformers 5.24 renamed the KV cache argument `past_key_values` to `cache` (the old name is
deprecated until 5.40): the forwards take either and pass it on under the name the wrapped
module declares.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from packtune.integrations.lm_head import HeadTransform, fused_lm_head_output, fused_loss
from packtune.kernels import (
    PackedLayout,
    geglu,
    masked_cross_entropy,
    rms_norm,
    rope_cos_sin,
    rotary,
    shift_labels,
    swiglu,
    varlen_attention,
)
from packtune.model.families import HFModules
from packtune.model.rope import longrope_rows


@dataclass(frozen=True)
class PacktuneOptions:
    """Which parts of the model apply_packtune replaces (each switch of apply_packtune)."""

    fused_loss: bool = True
    rms_norm: bool = True
    swiglu: bool = True
    rotary: bool = True
    packed: bool = True
    lora: bool = True
    geglu: bool = True


@functools.cache
def _cache_name(fn: Callable) -> str:
    """The KV cache argument's name in a transformers forward or output class `__init__`:
    `cache` from 5.24 on."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _pop_cache(past_key_values, kwargs: dict):
    """The KV cache, whichever name the caller used (the other is removed from `kwargs`)."""
    cache = kwargs.pop("cache", None)
    return cache if past_key_values is None else past_key_values


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def gemma_rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm scales by 1 + weight."""
    return rms_norm(x, self.weight, self.eps, offset=1.0)


def swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def fused_swiglu_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Phi-3: gate and up in one projection, gate first."""
    return self.down_proj(swiglu(*self.gate_up_proj(hidden_states).chunk(2, dim=-1)))


def geglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


@dataclass(frozen=True)
class PackedRope:
    """One layer's rotary inputs in a packed row: fp32 cos/sin tables and each token's row in them
    (its position, or past the short-factor rows for a long sample under longrope)."""

    cos: torch.Tensor
    sin: torch.Tensor
    rows: torch.Tensor


def attention_forward_for(modeling: types.ModuleType, spec: HFModules, options: PacktuneOptions) -> Callable:
    """The family's attention forward: for packed rows packtune's rotary and varlen attention,
    otherwise transformers' own forward (the class's, called unchanged)."""

    def window(attn: nn.Module) -> int | None:
        if not spec.window_per_layer:  # one window on every layer
            return getattr(attn.config, "sliding_window", None)
        return getattr(attn, "sliding_window", None)  # per layer (None on full-attention layers)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        layout, rope = kwargs.pop("packed_layout", None), kwargs.pop("packed_rope", None)
        if layout is None:
            return type(self).forward(self, hidden_states, *args, **kwargs)
        x = hidden_states[0]  # one packed row [1, T, H]
        if spec.fused_projections:
            q_dim = self.config.num_attention_heads * self.head_dim
            kv_dim = self.config.num_key_value_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split((q_dim, kv_dim, kv_dim), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if spec.qk_norm == "projection":  # norms over all heads before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(x.shape[0], -1, self.head_dim) for t in (q, k, v))
        if spec.qk_norm == "head":  # per-head norms before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if options.rotary:
            r = rope.cos.shape[-1]  # Phi-3's partial rotary: the leading r dims rotate
            q_rot, k_rot = rotary(q[..., :r], k[..., :r], rope.cos, rope.sin, position_ids=rope.rows)
            q, k = (q_rot, k_rot) if r == self.head_dim else (
                torch.cat((q_rot, q[..., r:]), dim=-1), torch.cat((k_rot, k[..., r:]), dim=-1))
        else:  # transformers' own rotation of the per-token cos/sin
            cos, sin = (t[0] for t in kwargs["position_embeddings"])
            q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        softcap = self.attn_logit_softcapping if spec.attention_softcap else None
        out = varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, window=window(self),
                               scale=self.scaling, softcap=softcap)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), None

    return forward


class ForwardState:
    """Whether the patched causal-LM forward is running (apply_packtune warns when a training
    forward reaches the final norm without it: something else computes the loss)."""

    def __init__(self) -> None:
        self.inside = False


def causal_lm_forward_for(options: PacktuneOptions, state: ForwardState, head: HeadTransform) -> Callable:
    """The *ForCausalLM forward: packed rows through varlen attention, the fused loss in training,
    and TRL's `fused_lm_head=True` call answered by packtune's kernel with TRL's `head` settings
    (see lm_head.py)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import slice_logits_to_keep

    def forward(self, *args, **kwargs):  # takes patched's signature (the Trainer inspects it)
        state.inside = True
        try:
            return patched(self, *args, **kwargs)
        finally:
            state.inside = False

    def patched(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        past_key_values = _pop_cache(past_key_values, kwargs)
        return_dict = kwargs.pop("return_dict", None)
        given_shift_labels = kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("num_label_tokens", None)  # PackedCollator's host-side count; the Trainer sends its own
        layout = kwargs.pop("packed_layout", None)
        fused_lm_head = kwargs.pop("fused_lm_head", False)  # TRL's SFT/DPOTrainer ask for per-token outputs
        has_labels = labels is not None or given_shift_labels is not None
        if fused_lm_head and not (options.fused_loss and has_labels):
            raise ValueError(
                "fused_lm_head=True (TRL's SFT/DPOTrainer) needs labels and apply_packtune(fused_loss=True)"
            )
        layout = (
            _packed_layout(layout, kwargs, input_ids, inputs_embeds, attention_mask, position_ids,
                           past_key_values)
            if options.packed
            else _drop_packing_keys(kwargs)
        )
        if layout is not None:
            hidden = _packed_hidden_states(self.model, input_ids, inputs_embeds, layout, kwargs)
            outputs = None
        else:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{_cache_name(type(self.model).forward): past_key_values},
                **kwargs,
            )
            hidden = outputs.last_hidden_state
        targets = None
        if given_shift_labels is not None:
            targets = given_shift_labels.reshape(-1)
        elif labels is not None:
            targets = _shift(labels, layout)
        softcap = getattr(self.config, "final_logit_softcapping", None)  # Gemma
        if fused_lm_head:
            return fused_lm_head_output(
                hidden, self.lm_head, targets, drop_last=given_shift_labels is None, num_items=num_items,
                softcap=softcap, head=head,
            )
        loss = logits = None
        if has_labels and options.fused_loss and self.training:
            loss = fused_loss(hidden, self.lm_head, targets, num_items, layout=layout, softcap=softcap)
        else:
            logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
            if softcap is not None:  # as transformers' Gemma: cap * tanh(logits / cap)
                logits = torch.tanh(logits / softcap) * softcap
            if has_labels and options.fused_loss:
                loss = masked_cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    targets,
                    reduction="sum" if num_items is not None else "mean",
                    num_items=num_items,
                )
            elif has_labels:
                loss = self.loss_function(
                    logits=logits,
                    labels=labels,
                    shift_labels=targets.view(hidden.shape[:-1]),
                    vocab_size=self.config.vocab_size,
                    num_items_in_batch=num_items,
                    **kwargs,
                )
        cache_name = _cache_name(CausalLMOutputWithPast.__init__)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{cache_name: None if outputs is None else getattr(outputs, cache_name)},
            hidden_states=None if outputs is None else outputs.hidden_states,
            attentions=None if outputs is None else outputs.attentions,
        )
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    return functools.wraps(patched)(forward)


# ---- packed rows -----------------------------------------------------------------------------


def _drop_packing_keys(kwargs: dict) -> None:
    """apply_packtune(packed=False): the collator's packing keys are not for transformers' layers."""
    for key in ("packed_layout", "cu_seqlens", "max_seqlen"):
        kwargs.pop(key, None)
    return None


def _packed_layout(layout: PackedLayout | None, kwargs: dict, input_ids, inputs_embeds, attention_mask,
                   position_ids, past_key_values) -> PackedLayout | None:
    """The PackedLayout of a packed row on the model's device, else None.

    PackedCollator's `packed_layout` wins (built on the host with the batch: no sync). Otherwise
    sample offsets (`cu_seqlens`, or transformers' flash-attention `cu_seq_lens_q`), or, for a
    single row without attention_mask or cache, position_ids that restart (as transformers
    detects packing); either costs one device-to-host copy.
    """
    cu_seqlens = kwargs.pop("cu_seqlens", None)
    kwargs.pop("max_seqlen", None)
    hf_cu = kwargs.pop("cu_seq_lens_q", None)
    for key in ("max_length_q", "cu_seq_lens_k", "max_length_k"):  # _k equal to _q in self-attention
        kwargs.pop(key, None)
    tokens = input_ids if input_ids is not None else inputs_embeds
    if layout is None:
        cu_seqlens = cu_seqlens if cu_seqlens is not None else hf_cu
        if cu_seqlens is not None:
            layout = PackedLayout.from_cu_seqlens(cu_seqlens)
        else:
            if position_ids is None or attention_mask is not None or past_key_values is not None:
                return None
            if position_ids.dim() != 2 or tokens.shape[0] != 1 or position_ids.shape[0] != 1:
                return None
            pos = position_ids[0].cpu()
            starts = torch.ones_like(pos, dtype=torch.bool)
            starts[1:] = pos[1:] != pos[:-1] + 1
            start_idx = starts.nonzero()[:, 0]
            if len(start_idx) == 1:
                return None
            layout = PackedLayout.packed(torch.diff(start_idx, append=torch.tensor([len(pos)])).numpy())
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(
            f"packed forward: cu_seqlens needs one packed row [1, T], got input of shape "
            f"{tuple(tokens.shape[:2])}"
        )
    if attention_mask is not None:
        raise ValueError(
            "packed forward: pass no attention_mask with cu_seqlens (samples are delimited by it)"
        )
    return layout.to(tokens.device)


def _packed_hidden_states(base: nn.Module, input_ids, inputs_embeds, layout: PackedLayout,
                          kwargs: dict) -> torch.Tensor:
    """The base model's forward for one packed row, without a mask: varlen attention isolates samples."""
    for unsupported in ("output_hidden_states", "output_attentions"):
        if kwargs.pop(unsupported, False):
            raise ValueError(
                f"packed forward: {unsupported}=True is not supported with apply_packtune(packed=True)"
            )
    hidden = base.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    position_ids = layout.positions[None]
    ropes = _packed_ropes(base, hidden, layout)
    layer_types = getattr(base.config, "layer_types", None)
    for i, layer in enumerate(base.layers[: base.config.num_hidden_layers]):
        position_embeddings, rope = ropes[layer_types[i] if None not in ropes else None]
        hidden = layer(
            hidden,
            attention_mask=None,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            use_cache=False,
            packed_layout=layout,
            packed_rope=rope,
            **kwargs,
        )
    return base.norm(hidden)


def _packed_ropes(base: nn.Module, hidden: torch.Tensor, layout: PackedLayout) -> dict:
    """{layer type (Gemma 3's full / sliding attention; None for one RoPE): (transformers' per-token
    cos/sin for `rotary=False`, PackedRope)}, built once per forward for all layers.

    The tables are fp32 `[max_seqlen, rotary_dim]` from the model's own inverse frequencies, after its
    rotary module has run (so dynamic scaling has updated them). Phi-3's longrope picks short or
    long factors by the length of the sequence it is given: here by each sample's own length, from
    tables stacked [short; long] (the attention factor on both), as each sample alone would get.
    """
    rope = base.rotary_emb
    position_ids = layout.positions[None]
    per_type = isinstance(rope.rope_type, dict)
    out = {}
    for layer_type in rope.layer_types if per_type else [None]:
        prefix, extra = ("", {}) if layer_type is None else (f"{layer_type}_", {"layer_type": layer_type})
        position_embeddings = rope(hidden, position_ids, **extra)
        scaling = getattr(rope, f"{prefix}attention_scaling")
        n = layout.max_seqlen
        if (rope.rope_type[layer_type] if per_type else rope.rope_type) != "longrope":
            cos, sin = rope_cos_sin(getattr(rope, f"{prefix}inv_freq"), n, scaling)
            out[layer_type] = position_embeddings, PackedRope(cos, sin, layout.positions)
            continue
        params = base.config.rope_parameters
        original = (params if layer_type is None else params[layer_type])["original_max_position_embeddings"]
        short = rope_cos_sin(getattr(rope, f"{prefix}original_inv_freq"), n, scaling)
        long = rope_cos_sin(getattr(rope, f"{prefix}long_inv_freq"), n, scaling)
        cos, sin = torch.cat((short[0], long[0])), torch.cat((short[1], long[1]))
        rows = longrope_rows(layout.positions, layout.cu_seqlens, original, n)
        dtype = position_embeddings[0].dtype
        out[layer_type] = (cos[rows][None].to(dtype), sin[rows][None].to(dtype)), PackedRope(cos, sin, rows)
    return out


def _shift(labels: torch.Tensor, layout: PackedLayout | None) -> torch.Tensor:
    """Flat next-token targets from Hugging Face's unshifted labels (`shift_labels`): a packed row
    ends a sample at each of its layout's offsets, a padded batch at the end of each row."""
    flat = labels.reshape(-1)
    if layout is not None:
        ends = layout.cu_seqlens[1:].long() - 1
    else:
        width = labels.shape[-1]
        ends = torch.arange(width - 1, flat.numel(), width, device=labels.device)
    return shift_labels(flat, ends)
