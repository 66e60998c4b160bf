"""The shape and options of a T5 encoder-decoder (T5 v1.1, FLAN-T5, mT5, the original T5).

`T5Args` is a `ModelArgs` (so `ModelArgs.from_file`, `to_hf_config` and hf_io read and write it
through the family registry like any family's) whose shared fields hold the encoder's shape, named
as the decoders name theirs: `hidden_size` is d_model, `intermediate_size` d_ff, `num_hidden_layers`
the encoder's num_layers, `num_attention_heads` (= `num_key_value_heads`) num_heads, `head_dim` d_kv,
`rms_norm_eps` layer_norm_epsilon, `hidden_act` the feed-forward activation (gelu_new or relu). The
fields below are T5's own. The RoPE fields are unused: T5 has relative position biases instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from packtune.errors import ModelError
from packtune.model.config import ModelArgs

FEED_FORWARD = {"gated-gelu": "gelu_new", "relu": "relu"}
"""config.json's `feed_forward_proj` -> the activation: GeGLU with tanh GELU (T5 v1.1, FLAN-T5, mT5),
or an ungated ReLU (the original T5)."""


@dataclass
class T5Args(ModelArgs):
    """ModelArgs of a T5 (see the module docstring for how the shared fields read)."""

    model_type: str = "t5"
    num_decoder_layers: int = 6
    relative_attention_num_buckets: int = 32
    """Buckets of the relative position bias (per direction in the encoder: half each way)."""
    relative_attention_max_distance: int = 128
    """Relative positions at or beyond this distance share the last bucket."""
    feed_forward_proj: str = "gated-gelu"
    scale_decoder_outputs: bool = True
    """The decoder's final hidden states are multiplied by hidden_size ** -0.5 before the head
    (T5 with its head tied to the embeddings: transformers' `scale_decoder_outputs`)."""
    decoder_start_token_id: int = 0
    """The decoder's first input token (T5: the pad token)."""
    initializer_factor: float = 1.0
    """T5's init scale (transformers' `initializer_factor`): every std is factor x T5's own."""

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ModelError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported "
                             f"(supported: {', '.join(FEED_FORWARD)})")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ModelError("T5 has one key/value head per query head")

    @property
    def gated(self) -> bool:
        """Whether the feed-forward is gated (wi_0, wi_1, wo) or not (wi, wo)."""
        return self.feed_forward_proj.startswith("gated-")
