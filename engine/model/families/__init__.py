"""The model families packtune runs, one file each, registered by config.json's `model_type`
(family.py says what a family holds). A new family is a new file here, imported below."""

from packtune.model.families import (  # noqa: F401
    bloom,
    gemma,
    gpt_oss,
    granite,
    llama,
    mistral,
    mixtral,
    olmo2,
    olmoe,
    phi3,
    qwen2,
    qwen3,
    qwen3_moe,
    t5,
)
from packtune.model.families.decoder import decoder_flops
from packtune.model.families.family import (
    Family,
    HFConfig,
    HFModules,
    build_model,
    encoder_decoder,
    families,
    family_for,
    family_for_architecture,
    lora_target_names,
    model_types,
)

__all__ = ["Family", "HFConfig", "HFModules", "build_model", "decoder_flops", "encoder_decoder", "families",
           "family_for", "family_for_architecture", "lora_target_names", "model_types"]
