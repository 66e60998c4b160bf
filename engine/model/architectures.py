"""Which packtune model class runs a config: BLOOM's own, or the Llama-family decoder for the rest.

Both are `CausalLM`s (engine/model/causal_lm.py), one interface.
"""

from __future__ import annotations

from packtune.model.bloom import BloomForCausalLM
from packtune.model.causal_lm import CausalLM
from packtune.model.config import ModelArgs
from packtune.model.llama import LlamaForCausalLM


def causal_lm(args: ModelArgs) -> CausalLM:
    """A new model for `args` (on the current default device), weights uninitialised."""
    return BloomForCausalLM(args) if args.model_type == "bloom" else LlamaForCausalLM(args)
