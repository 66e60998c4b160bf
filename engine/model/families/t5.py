"""T5 encoder-decoders (transformers' T5ForConditionalGeneration and MT5ForConditionalGeneration): T5
v1.1, FLAN-T5, mT5 and the original T5, run by packtune's own model (engine/model/t5.py).

config.json names the shape T5's way (`d_model`, `d_kv`, `d_ff`, `num_layers`, `num_decoder_layers`,
`num_heads`, `layer_norm_epsilon`, `feed_forward_proj`). Two rules follow transformers (5.x), which
writes `tie_word_embeddings: true` into every T5 config it saves:

- the head is tied to the embeddings exactly when the checkpoint stores no `lm_head.weight`
  (`checkpoint_args`; transformers unties a stored head that differs from the embeddings);
- T5 scales the decoder's output by d_model ** -0.5 before the head when `scale_decoder_outputs`
  says so, which defaults to config.json's `tie_word_embeddings` (true for the original T5, false
  in T5 v1.1 and FLAN-T5 files); mT5 never scales.

`dropout_rate` is kept in config.json but not applied: packtune trains without dropout.
Checkpoints may also store the embedding under the stacks' tied names (`encoder.embed_tokens.weight`,
`decoder.embed_tokens.weight`) and an unused cross-attention bias table; those are read as transformers
reads them (`stored`, `unread_names`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

from packtune.errors import ModelError
from packtune.model.config import ModelArgs
from packtune.model.families.decoder import REJECTED_KEYS
from packtune.model.families.family import Family, HFConfig, register
from packtune.model.t5 import T5ForConditionalGeneration
from packtune.model.t5_config import FEED_FORWARD, T5Args
from packtune.model.t5_generate import generate_seq2seq
from packtune.seq2seq_loss import Seq2SeqLoss

T5_LINEARS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
"""The linears of T5's blocks (self- and cross-attention q/k/v/o; wi or wi_0/wi_1, and wo), as PEFT names
them: LoRA's targets."""
TIED_NAMES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
"""transformers' names of the stacks' embeddings, tied to `shared.weight`."""
UNUSED_NAMES = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
"""Stored by old checkpoints, ignored by transformers (cross-attention has no position bias)."""


def parse(c: HFConfig, model_type: str) -> T5Args:
    for key in REJECTED_KEYS:
        if c.raw.get(key):
            raise ModelError(f"config option {key!r} is not supported")
    projection = c.get("feed_forward_proj")
    if projection not in FEED_FORWARD:
        raise ModelError(f"feed_forward_proj={projection!r} is not supported "
                         f"(supported: {', '.join(FEED_FORWARD)})")
    layers = c.required("num_layers")
    tied = c.get("tie_word_embeddings") is not False
    scale = model_type == "t5" and bool(c.raw.get("scale_decoder_outputs", tied))
    return T5Args(
        model_type=model_type,
        vocab_size=c.required("vocab_size"),
        hidden_size=c.required("d_model"),
        intermediate_size=c.required("d_ff"),
        num_hidden_layers=layers,
        num_decoder_layers=c.get("num_decoder_layers") or layers,
        num_attention_heads=c.required("num_heads"),
        num_key_value_heads=c.required("num_heads"),
        head_dim=c.required("d_kv"),
        rms_norm_eps=float(c.get("layer_norm_epsilon")),
        relative_attention_num_buckets=c.required("relative_attention_num_buckets"),
        relative_attention_max_distance=c.required("relative_attention_max_distance"),
        feed_forward_proj=projection,
        hidden_act=FEED_FORWARD[projection],
        tie_word_embeddings=tied,
        scale_decoder_outputs=scale,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
        decoder_start_token_id=_decoder_start(c),
        initializer_factor=float(c.get("initializer_factor")),
        dtype=c.raw.get("dtype") or c.raw.get("torch_dtype"),
        hf_config=dict(c.raw),
    )


def _decoder_start(c: HFConfig) -> int:
    """`decoder_start_token_id`, or the pad token where it is not set (T5's start token)."""
    start = c.get("decoder_start_token_id")
    start = c.get("pad_token_id") if start is None else start
    if not isinstance(start, int):
        raise ModelError("decoder_start_token_id is not set (and no pad_token_id to start the decoder with)")
    return start


def write(args: ModelArgs) -> dict[str, Any]:
    """T5Config's own keys; the original's others kept."""
    assert isinstance(args, T5Args)
    cfg = dict(args.hf_config)
    cfg.update(
        vocab_size=args.vocab_size,
        d_model=args.hidden_size,
        d_ff=args.intermediate_size,
        d_kv=args.head_dim,
        num_layers=args.num_hidden_layers,
        num_decoder_layers=args.num_decoder_layers,
        num_heads=args.num_attention_heads,
        layer_norm_epsilon=args.rms_norm_eps,
        relative_attention_num_buckets=args.relative_attention_num_buckets,
        relative_attention_max_distance=args.relative_attention_max_distance,
        feed_forward_proj=args.feed_forward_proj,
        tie_word_embeddings=args.tie_word_embeddings,
        bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id,
        pad_token_id=args.pad_token_id,
        decoder_start_token_id=args.decoder_start_token_id,
        initializer_factor=args.initializer_factor,
        is_encoder_decoder=True,
    )
    if args.model_type == "t5":
        cfg["scale_decoder_outputs"] = args.scale_decoder_outputs
    return cfg


def checkpoint_args(args: ModelArgs, stored: Collection[str]) -> ModelArgs:
    """Tied exactly when no `lm_head.weight` is stored (transformers 5 writes `tie_word_embeddings: true`
    into every T5 config, and unties a stored head)."""
    return replace(args, tie_word_embeddings="lm_head.weight" not in stored)


def stored(names: list[str]) -> dict[str, str]:
    """`shared.weight` from a stack's copy where the checkpoint stores it only there (the copies and the
    unused cross-attention table are the family's `unread_names`)."""
    if "shared.weight" in names:
        return {}
    found = next((name for name in TIED_NAMES if name in names), None)
    return {} if found is None else {"shared.weight": found}


def pair_flops(args: ModelArgs, input_len: int, target_len: int) -> int:
    """Training FLOPs (forward + backward) of one pair: 6 x the parameters each token passes through
    (the encoder's blocks for an input token; the decoder's and the head for a target token; the
    cross-attention k/v projections once per input token per decoder block) plus 12 x heads x head_dim
    x the keys each token attends over per block (self-attention over its own side, cross-attention
    over the input), as families/decoder.py counts attention."""
    assert isinstance(args, T5Args)
    h, inner, ff = args.hidden_size, args.num_attention_heads * args.head_dim, args.intermediate_size
    mlp = (3 if args.gated else 2) * h * ff
    encoder = args.num_hidden_layers * (4 * h * inner + mlp + 2 * h) + h
    decoder = args.num_decoder_layers * (6 * h * inner + mlp + 3 * h) + h + args.vocab_size * h
    cross_kv = args.num_decoder_layers * 2 * h * inner
    params = input_len * (encoder + cross_kv) + target_len * decoder
    attention = 12 * inner * (args.num_hidden_layers * input_len * input_len
                              + args.num_decoder_layers * target_len * (target_len + input_len))
    return 6 * params + attention


def flops(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token of a pair whose input and target both have `seq_len` tokens."""
    return pair_flops(args, seq_len, seq_len) // (2 * seq_len)


def _family(model_type: str, architecture: str, defaults: dict[str, Any]) -> Family:
    return register(Family(
        model_type=model_type,
        architecture=architecture,
        parse=lambda c: parse(c, model_type),
        write=write,
        build=T5ForConditionalGeneration,
        lora_targets=T5_LINEARS,
        defaults={"layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "pad_token_id": 0, "eos_token_id": 1,
                  **defaults},
        flops=flops,
        hf_refusal="apply_packtune routes transformers' decoder-only forwards through packed rows; an "
                   "encoder-decoder's forward takes padded pairs (its relative position biases and "
                   "cross-attention masks are built per padded batch)",
        stored=stored,
        unread_names=TIED_NAMES + UNUSED_NAMES,
        checkpoint_args=checkpoint_args,
        encoder_decoder=True,
        loss=Seq2SeqLoss,
        generate=generate_seq2seq,
        peft_task_type="SEQ_2_SEQ_LM",
    ))


T5 = _family("t5", "T5ForConditionalGeneration", {"feed_forward_proj": "relu"})
MT5 = _family("mt5", "MT5ForConditionalGeneration", {"feed_forward_proj": "gated-gelu"})
