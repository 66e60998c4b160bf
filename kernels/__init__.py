"""packtune.kernels: fused loss and packed-sequence ops for SFT, usable from any trainer.

Every op has a Triton implementation (CUDA), a C++ implementation (CPU, packtune._C) and a
PyTorch reference; `packtune.kernels._dispatch` picks one per call. The LoRA linear and LoRA MLP
are autograd Functions over BLAS GEMMs on every device, beside their references (kernels/lora.py).
"""

from packtune.kernels._dispatch import BACKENDS, registered_ops, resolve_backend
from packtune.kernels.attention import varlen_attention, varlen_attention_ref
from packtune.kernels.cross_entropy import MaskedCrossEntropy, masked_cross_entropy, masked_cross_entropy_ref
from packtune.kernels.linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy
from packtune.kernels.lora import lora_linear, lora_linear_ref
from packtune.kernels.lora_mlp import lora_mlp, lora_mlp_ref
from packtune.kernels.rms_norm import RMSNorm, rms_norm, rms_norm_ref
from packtune.kernels.rotary import RotaryEmbedding, rope_cos_sin, rotary, rotary_ref
from packtune.kernels.swiglu import SwiGLU, swiglu, swiglu_ref

__all__ = [
    "BACKENDS",
    "registered_ops",
    "resolve_backend",
    "masked_cross_entropy",
    "masked_cross_entropy_ref",
    "MaskedCrossEntropy",
    "linear_cross_entropy",
    "LinearCrossEntropy",
    "lora_linear",
    "lora_linear_ref",
    "lora_mlp",
    "lora_mlp_ref",
    "rotary",
    "rotary_ref",
    "rope_cos_sin",
    "RotaryEmbedding",
    "rms_norm",
    "rms_norm_ref",
    "RMSNorm",
    "swiglu",
    "swiglu_ref",
    "SwiGLU",
    "varlen_attention",
    "varlen_attention_ref",
]
