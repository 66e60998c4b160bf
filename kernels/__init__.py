"""packtune.kernels: fused loss and packed-sequence ops for SFT, usable from any trainer.

Every op has a Triton implementation (CUDA), a C++ implementation (CPU, packtune._C) and a
PyTorch reference; `packtune.kernels._dispatch` picks one per call.
"""

from packtune.kernels._dispatch import BACKENDS, registered_ops, resolve_backend
from packtune.kernels.cross_entropy import MaskedCrossEntropy, masked_cross_entropy
from packtune.kernels.linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy

__all__ = [
    "BACKENDS",
    "LinearCrossEntropy",
    "MaskedCrossEntropy",
    "linear_cross_entropy",
    "masked_cross_entropy",
    "registered_ops",
    "resolve_backend",
]
