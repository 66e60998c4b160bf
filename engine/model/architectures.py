"""Which packtune model class runs a config: BLOOM's own, or the Llama-family decoder for the rest.

Both share one interface: `args`, `hidden_states(input_ids, layout, cache)`, `logits`, `forward`,
`lm_head`, `embed_tokens`, `decoder_layers` (the blocks FSDP wraps), `embedding_name`,
`tie_weights`, `init_weights` and `source_dir`.
"""

from __future__ import annotations

from packtune.model.bloom import BloomForCausalLM
from packtune.model.config import ModelArgs
from packtune.model.llama import LlamaForCausalLM

CausalLM = LlamaForCausalLM | BloomForCausalLM


def causal_lm(args: ModelArgs) -> CausalLM:
    """A new model for `args` (on the current default device), weights uninitialised."""
    return BloomForCausalLM(args) if args.model_type == "bloom" else LlamaForCausalLM(args)
