"""packtune.kernels: fused loss and packed-sequence ops for SFT, usable from any trainer.

What each op has (`packtune.kernels._dispatch` picks the backend per call; `registered_ops()`):

    masked_cross_entropy, linear_cross_entropy, rms_norm, rotary, glu (swiglu, geglu)
        Triton (CUDA, or the interpreter on CPU), C++ (CPU, packtune._C) and a PyTorch reference
    logprobs, linear_logprobs
        label log-probs per token or summed per segment (preference losses), from logits (the CE row
        kernel, its gradient formed in the forward, optionally over the logits) or from hidden states
        and the lm_head (linear_cross_entropy's chunks and row kernels): the same three backends
    varlen_attention
        flash-attn or torch's varlen_attn on CUDA fp16/bf16, else batched PyTorch SDPA over length
        buckets (any device); `varlen_attention_ref` (SDPA per sample) is the reference;
        ALiBi (BLOOM) through flash-attn's alibi_slopes or SDPA's float mask
    varlen_relative_attention, varlen_cross_attention
        T5's attention over packed pairs: a relative position bias per head (FlexAttention on CUDA,
        SDPA over length buckets elsewhere) and cross-attention with separate query and key
        cu_seqlens (flash-attn or torch's varlen_attn on CUDA fp16/bf16, else SDPA over pair
        buckets); `*_ref` (SDPA per segment) are the references
    bloom_gelu
        Triton (CUDA, or the interpreter) and the reference's torch ops (every device): a pointwise
        op, where torch's own CPU kernels are the C++ path
    PackedLayout, shift_labels, Seq2SeqLayout
        the packed-batch contract every op above reads (plain PyTorch/numpy, built on the host);
        Seq2SeqLayout: an encoder-decoder row of (input, target) pairs, one PackedLayout per side
    lora_linear, lora_mlp
        torch GEMMs on every device; on CUDA Triton kernels fuse the LoRA parts around them
        (dropout from a seed, the update added into the output tile, the MLP's gate); references beside
    moe_experts
        a mixture-of-experts block's experts (tokens sorted by expert, grouped GEMMs, transformers 5's
        fused weight layouts, SwiGLU or gpt-oss's clamped variant): Triton on CUDA (no host sync),
        C++ (CPU, packtune._C) and `moe_experts_ref` (a loop over experts, as transformers' eager)
    nf4_matmul
        QLoRA's base GEMMs over a torchao NF4 weight: on CUDA Triton kernels dequantise it tile by
        tile in registers (forward and dx); elsewhere torch dequantises the layer, then matmul
"""

if __name__ == "kernels":
    # Imported as the top-level name `kernels` because the repository root is on sys.path (Python
    # started there): that name belongs to Hugging Face's `kernels` package (transformers imports it).
    from ._shadowed import load_installed_kernels

    load_installed_kernels()
else:
    from packtune.kernels._dispatch import BACKENDS, registered_ops, resolve_backend
    from packtune.kernels.attention import varlen_attention, varlen_attention_ref
    from packtune.kernels.bloom_gelu import bloom_gelu, bloom_gelu_ref
    from packtune.kernels.cross_attention import varlen_cross_attention, varlen_cross_attention_ref
    from packtune.kernels.cross_entropy import (
        MaskedCrossEntropy,
        masked_cross_entropy,
        masked_cross_entropy_ref,
    )
    from packtune.kernels.glu import SwiGLU, geglu, geglu_ref, glu, glu_ref, swiglu, swiglu_ref
    from packtune.kernels.linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy
    from packtune.kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref
    from packtune.kernels.logprobs import layout_segments, logprobs, logprobs_ref
    from packtune.kernels.lora import lora_linear, lora_linear_ref
    from packtune.kernels.lora_mlp import lora_mlp, lora_mlp_ref
    from packtune.kernels.moe import (
        SWIGLU,
        ExpertFormat,
        ExpertRouting,
        gpt_oss_format,
        moe_experts,
        moe_experts_ref,
        route_to_experts,
    )
    from packtune.kernels.nf4_matmul import nf4_matmul, nf4_matmul_ref
    from packtune.kernels.packed_layout import IGNORE_INDEX, PackedLayout, shift_labels
    from packtune.kernels.relative_attention import varlen_relative_attention, varlen_relative_attention_ref
    from packtune.kernels.rms_norm import RMSNorm, rms_norm, rms_norm_ref
    from packtune.kernels.rotary import RotaryEmbedding, rope_cos_sin, rotary, rotary_ref
    from packtune.kernels.seq2seq_layout import Seq2SeqLayout

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "PackedLayout",
    "Seq2SeqLayout",
    "shift_labels",
    "registered_ops",
    "resolve_backend",
    "masked_cross_entropy",
    "masked_cross_entropy_ref",
    "MaskedCrossEntropy",
    "linear_cross_entropy",
    "LinearCrossEntropy",
    "logprobs",
    "logprobs_ref",
    "linear_logprobs",
    "linear_logprobs_ref",
    "layout_segments",
    "lora_linear",
    "lora_linear_ref",
    "lora_mlp",
    "lora_mlp_ref",
    "moe_experts",
    "moe_experts_ref",
    "ExpertFormat",
    "ExpertRouting",
    "SWIGLU",
    "gpt_oss_format",
    "route_to_experts",
    "nf4_matmul",
    "nf4_matmul_ref",
    "rotary",
    "rotary_ref",
    "rope_cos_sin",
    "RotaryEmbedding",
    "rms_norm",
    "rms_norm_ref",
    "RMSNorm",
    "glu",
    "glu_ref",
    "swiglu",
    "swiglu_ref",
    "SwiGLU",
    "geglu",
    "geglu_ref",
    "varlen_attention",
    "varlen_attention_ref",
    "varlen_relative_attention",
    "varlen_relative_attention_ref",
    "varlen_cross_attention",
    "varlen_cross_attention_ref",
    "bloom_gelu",
    "bloom_gelu_ref",
]
