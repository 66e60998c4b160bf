"""T5's attention on CUDA at FLAN-T5-base's shape (12 heads of 64) against the float64 per-segment
references, forward and backward: the relative-position-biased self-attention (FlexAttention, both
directions; the bias table's gradient included) and the cross-attention (flash-attn or torch's
varlen_attn, and the pair buckets), with segments of length 1 and of very different lengths and rows
past cu_seqlens[-1]; then a small T5 on CUDA against itself on the CPU in float64. Skipped without CUDA.

Error bar against float64, as tests/gpu/test_gpu_attention.py: the output no worse than the per-segment
reference's own error in the same dtype + 1e-2; gradients within twice its error + 1e-2 + one bf16 step
(2^-8) of the largest gradient entry.
"""

import pytest
import torch

from packtune.kernels import qk_attention
from packtune.kernels.cross_attention import varlen_cross_attention, varlen_cross_attention_ref
from packtune.kernels.relative_attention import (
    relative_bias,
    varlen_relative_attention,
    varlen_relative_attention_ref,
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # slow: the full gpu-check pass only
HEADS, DIM = 12, 64
INPUTS = [100, 1, 300, 37, 511, 3]
TARGETS = [64, 1, 5, 200, 17, 130]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def _tensors(n, dtype, tail=7):
    return [torch.randn(n + tail, HEADS, DIM, device="cuda", dtype=dtype) for _ in range(3)]


def _fwd_bwd(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def _check(fn, reference, tensors, cu_q, names):
    dout = torch.randn_like(tensors[0], dtype=torch.float64)
    got = _fwd_bwd(fn, tensors, dout)
    exact = _fwd_bwd(reference, [t.double() for t in tensors], dout)
    eager = _fwd_bwd(reference, tensors, dout)
    for name, out, ref, per_segment in zip(names, got, exact, eager, strict=True):
        assert torch.isfinite(out).all(), name
        err, ref_err = ((t.double() - ref).abs().max().item() for t in (out, per_segment))
        bar = ref_err + 1e-2 if name == "out" else 2 * ref_err + 1e-2 + 2**-8 * ref.abs().max().item()
        assert err <= bar, f"{name}: {err:.3g} vs the per-segment reference's {ref_err:.3g}"
    tail = got[0][int(cu_q[-1]):]
    assert torch.equal(tail, torch.zeros_like(tail)), "rows past cu_seqlens[-1] must be zeros"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal, lengths", [(False, INPUTS), (True, TARGETS)])
def test_relative_attention_matches_per_segment_reference(dtype, causal, lengths):
    """FlexAttention with T5's bias (32 buckets up to 128: segments past it reach the shared bucket)."""
    cu, longest = _cu(lengths), max(lengths)
    table = 2 * torch.randn(32, HEADS, device="cuda", dtype=dtype)

    def attend(fn):
        def call(q, k, v, table):
            return fn(q, k, v, relative_bias(table, longest, bidirectional=not causal, max_distance=128))
        return call

    fast = attend(lambda q, k, v, b: varlen_relative_attention(q, k, v, b, cu, longest, causal=causal))
    reference = attend(lambda q, k, v, b: varlen_relative_attention_ref(q, k, v, b, cu, causal=causal))
    q, k, v = _tensors(sum(lengths), dtype)  # scale None: head_dim ** -0.5 (T5 folds it into q's init)
    _check(fast, reference, [q, k, v, table], cu, ("out", "dq", "dk", "dv", "dtable"))


@pytest.mark.parametrize("path", ["native", "buckets"])
def test_cross_attention_matches_per_pair_reference(monkeypatch, path):
    if path == "buckets":
        monkeypatch.setattr(qk_attention, "attention_path", lambda *args, **kwargs: "buckets")
    cu_q, cu_k = _cu(TARGETS), _cu(INPUTS)
    q = _tensors(sum(TARGETS), torch.bfloat16)[0]
    k, v = _tensors(sum(INPUTS), torch.bfloat16, tail=0)[:2]
    fast = lambda q, k, v: varlen_cross_attention(q, k, v, cu_q, cu_k, max(TARGETS), max(INPUTS))
    reference = lambda q, k, v: varlen_cross_attention_ref(q, k, v, cu_q, cu_k)
    _check(fast, reference, [q, k, v], cu_q, ("out", "dq", "dk", "dv"))


def test_t5_on_cuda_matches_the_cpu_in_float64():
    """A small T5 (8 heads of 16, gated-GELU) on CUDA in fp32 (FlexAttention, the fused kernels) == the
    same weights on the CPU in float64: logits and the gradients of the summed cross-entropy."""
    from packtune.model.config import ModelArgs
    from packtune.model.families import build_model
    from packtune.model.t5_batch import pack_pairs

    args = ModelArgs.from_hf_config({
        "model_type": "t5", "vocab_size": 256, "d_model": 128, "d_kv": 16, "d_ff": 256, "num_layers": 2,
        "num_decoder_layers": 2, "num_heads": 8, "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "tie_word_embeddings": False, "scale_decoder_outputs": False})
    cpu = build_model(args).double()
    cpu.init_weights(torch.Generator().manual_seed(0))
    cuda = build_model(args).to("cuda")
    cuda.load_state_dict(cpu.state_dict())
    gen = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(2, 256, (n,), generator=gen).tolist()
    pairs = [(draw(n), draw(m)) for n, m in zip(INPUTS, TARGETS, strict=True)]
    batch = pack_pairs(pairs, args.decoder_start_token_id)
    results = []
    for model, device in ((cpu, "cpu"), (cuda, "cuda")):
        b = batch.to(device)
        logits = model(b.input_ids, b.decoder_input_ids, b.layout)
        torch.nn.functional.cross_entropy(logits, b.labels, reduction="sum").backward()
        grads = {n: p.grad.double().cpu() for n, p in model.named_parameters()}
        results.append((logits.detach().double().cpu(), grads))
    (expected, expected_grads), (logits, grads) = results
    scale = lambda t: t.abs().max().item()
    assert (logits - expected).abs().max().item() <= 5e-3 * scale(expected)  # TF32 matmuls allowed
    for name, grad in grads.items():
        assert (grad - expected_grads[name]).abs().max().item() <= 1e-2 * scale(expected_grads[name]), name
