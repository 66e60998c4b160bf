"""The forwards `apply_packtune` binds to a transformers model's modules (see transformers.py).

Each mirrors the transformers 5.x Llama/Mistral/Qwen2/Qwen3 forward it shadows, with packtune's ops in
place of the plain-torch ones and, for a packed row, its `PackedLayout` (from PackedCollator, or
built from `cu_seqlens` / restarting `position_ids`): varlen attention instead of a mask, and
packtune's rotary reading fp32 tables at the layout's positions. Unpacked batches (padded with
an attention mask, generation with a cache) keep transformers' own attention and rotary.
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

from packtune.integrations.lm_head import fused_lm_head_output, fused_loss
from packtune.kernels import (
    PackedLayout,
    masked_cross_entropy,
    rms_norm,
    rope_cos_sin,
    rotary,
    shift_labels,
    swiglu,
    varlen_attention,
)


@dataclass(frozen=True)
class PacktuneOptions:
    """Which parts of the model apply_packtune replaces (each switch of apply_packtune)."""

    fused_loss: bool = True
    rms_norm: bool = True
    swiglu: bool = True
    rotary: bool = True
    packed: bool = True
    lora: bool = True


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


def swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def attention_forward_for(modeling: types.ModuleType, family: str, options: PacktuneOptions) -> Callable:
    """The family's attention forward: for packed rows packtune's rotary and varlen attention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def window(attn: nn.Module) -> int | None:
        if family in ("Qwen2", "Qwen3"):
            return attn.sliding_window
        if family == "Mistral":
            return getattr(attn.config, "sliding_window", None)
        return None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ):
        past_key_values = _pop_cache(past_key_values, kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape)
        if family == "Qwen3":  # per-head norms before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        layout, tables = kwargs.pop("packed_layout", None), kwargs.pop("rope_tables", None)
        if layout is not None:  # one packed row [1, T]
            flat = lambda t: t.reshape(-1, *t.shape[2:])
            q, k, v = flat(q), flat(k), flat(v)
            if options.rotary:
                q, k = rotary(q, k, *tables, layout=layout)
            else:
                cos, sin = (t.reshape(-1, t.shape[-1]) for t in position_embeddings)
                q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            out = varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, window=window(self),
                                   scale=self.scaling)
            return self.o_proj(out.reshape(*input_shape, -1)), None
        cos, sin = position_embeddings
        q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling.eager_attention_forward
        )
        extra = {} if family == "Llama" else {"sliding_window": window(self)}
        out, weights = interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    return forward


class ForwardState:
    """Whether the patched causal-LM forward is running (apply_packtune warns when a training
    forward reaches the final norm without it: something else computes the loss)."""

    def __init__(self) -> None:
        self.inside = False


def causal_lm_forward_for(options: PacktuneOptions, state: ForwardState) -> Callable:
    """The *ForCausalLM forward: packed rows through varlen attention, the fused loss in training,
    and TRL's `fused_lm_head=True` call answered by packtune's kernel (see lm_head.py)."""
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
        fused_lm_head = kwargs.pop("fused_lm_head", False)  # TRL's SFTTrainer asks for per-token outputs
        has_labels = labels is not None or given_shift_labels is not None
        if fused_lm_head and not (options.fused_loss and has_labels):
            raise ValueError(
                "fused_lm_head=True (TRL's SFTTrainer) needs labels and apply_packtune(fused_loss=True)"
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
        if fused_lm_head:
            return fused_lm_head_output(
                hidden, self.lm_head, targets, drop_last=given_shift_labels is None, num_items=num_items
            )
        loss = logits = None
        if has_labels and options.fused_loss and self.training:
            loss = fused_loss(hidden, self.lm_head, targets, num_items, layout=layout)
        else:
            logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
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
    """The base model's forward for one packed row, without a mask: varlen attention isolates samples.

    The rotary tables are fp32 `[max_seqlen, head_dim]` from the model's own inverse frequencies
    (after its rotary module has run, so dynamic scaling has updated them), built once per forward
    for all layers; transformers' per-token cos/sin are passed on for `rotary=False`.
    """
    for unsupported in ("output_hidden_states", "output_attentions"):
        if kwargs.pop(unsupported, False):
            raise ValueError(
                f"packed forward: {unsupported}=True is not supported with apply_packtune(packed=True)"
            )
    hidden = base.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    position_ids = layout.positions[None]
    position_embeddings = base.rotary_emb(hidden, position_ids=position_ids)
    rope = base.rotary_emb
    tables = rope_cos_sin(rope.inv_freq, layout.max_seqlen, rope.attention_scaling)
    for layer in base.layers[: base.config.num_hidden_layers]:
        hidden = layer(
            hidden,
            attention_mask=None,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            use_cache=False,
            packed_layout=layout,
            rope_tables=tables,
            **kwargs,
        )
    return base.norm(hidden)


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
