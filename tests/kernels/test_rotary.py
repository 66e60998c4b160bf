import pytest
import torch
from kernel_checks import FUSED, assert_fp32_close, assert_low_precision_close, device_for

from packtune.kernels import RotaryEmbedding, rope_cos_sin, rotary, rotary_ref
from packtune.kernels.rotary import positions_from_cu_seqlens

ALL = [*FUSED, "torch"]


def _tables(head_dim, max_pos=64, device="cpu"):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    return rope_cos_sin(inv_freq, max_pos)


def _fwd_bwd(fn, q, k, dq, dk):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = fn(q, k)
    torch.autograd.backward((qo, ko), (dq, dk))
    return qo.detach(), ko.detach(), q.grad, k.grad


def _packed(lengths, hq, hk, d, device="cpu", dtype=torch.float32):
    t = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(t, hq, d, device=device, dtype=dtype)
    k = torch.randn(t, hk, d, device=device, dtype=dtype)
    return q, k, cu


def test_positions_restart_per_sample():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 9).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_fp32_matches_float64_reference(backend, head_dim):
    dev = device_for(backend)
    lengths = [1, 17, 1, 13, 5]  # one-token samples; T = 37 is no power of two
    q, k, cu = _packed(lengths, 4, 2, head_dim, dev)
    cos, sin = _tables(head_dim, device=dev)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    got = _fwd_bwd(lambda a, b: rotary(a, b, cos, sin, cu_seqlens=cu, backend=backend), q, k, dq, dk)
    pos = positions_from_cu_seqlens(cu, q.shape[0])
    c64, s64 = cos.double(), sin.double()
    exact = _fwd_bwd(lambda a, b: (rotary_ref(a, c64, s64, pos), rotary_ref(b, c64, s64, pos)),
                     q.double(), k.double(), dq.double(), dk.double())
    for i, (out, ref) in enumerate(zip(got, exact, strict=True)):
        assert_fp32_close(out, ref, 1e-5 if i < 2 else 1e-4)


@pytest.mark.parametrize("backend", ALL)
def test_partial_rotary_on_strided_views(backend):
    """Phi-3's partial rotary: the leading 48 of 64 dims, read as a strided view of q/k (no copy first);
    gradients reach only those dims."""
    dev = device_for(backend)
    q, k, cu = _packed([5, 9], 4, 2, 64, dev)
    cos, sin = _tables(48, device=dev)
    q, k = q.requires_grad_(), k.requires_grad_()
    qo, ko = rotary(q[..., :48], k[..., :48], cos, sin, cu_seqlens=cu, backend=backend)
    (qo.square().sum() + ko.sum()).backward()
    pos = positions_from_cu_seqlens(cu, q.shape[0])
    c64, s64 = cos.double(), sin.double()
    assert_fp32_close(qo, rotary_ref(q[..., :48].detach().double(), c64, s64, pos), 1e-5)
    assert_fp32_close(ko, rotary_ref(k[..., :48].detach().double(), c64, s64, pos), 1e-5)
    assert not q.grad[..., 48:].any() and not k.grad[..., 48:].any() and k.grad[..., :48].any()


@pytest.mark.parametrize("backend", ALL)
def test_packed_equals_per_sample(backend):
    dev = device_for(backend)
    lengths = [6, 1, 11, 3]
    q, k, cu = _packed(lengths, 3, 1, 64, dev)
    cos, sin = _tables(64, device=dev)
    qp, kp = rotary(q, k, cos, sin, cu_seqlens=cu, backend=backend)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks = rotary(q[s:e], k[s:e], cos, sin, backend=backend)
        assert torch.equal(qp[s:e], qs) and torch.equal(kp[s:e], ks)


@pytest.mark.parametrize("backend", ALL)
def test_batched_layout_with_position_ids(backend):
    dev = device_for(backend)
    q, k = torch.randn(2, 10, 4, 64, device=dev), torch.randn(2, 10, 2, 64, device=dev)
    cos, sin = _tables(64, device=dev)
    position_ids = torch.stack([torch.arange(10), torch.arange(10) + 5]).to(dev)
    qo, ko = rotary(q, k, cos, sin, position_ids=position_ids, backend=backend)
    for b in range(2):
        qb, kb = rotary(q[b], k[b], cos, sin, position_ids=position_ids[b], backend="torch")
        torch.testing.assert_close(qo[b], qb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ko[b], kb, rtol=1e-6, atol=1e-6)
    q0, k0 = rotary(q, k, cos, sin, backend=backend)  # no positions: 0..T-1 in every row
    torch.testing.assert_close(q0[1], rotary(q[1], k[1], cos, sin, backend="torch")[0], rtol=1e-6, atol=1e-6)
    assert k0.shape == k.shape


@pytest.mark.parametrize("backend", FUSED)
def test_bf16_no_worse_than_torch(backend):
    dev = device_for(backend)
    q, k, cu = _packed([9, 1, 20], 4, 4, 128, dev, torch.bfloat16)
    cos, sin = _tables(128, device=dev)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    pos = positions_from_cu_seqlens(cu, q.shape[0])

    def hf_style(a, b):  # what transformers does in bf16: tables cast to the input dtype
        c, s = cos[pos].to(a.dtype)[:, None], sin[pos].to(a.dtype)[:, None]
        rot = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), -1)
        return a * c + rot(a) * s, b * c + rot(b) * s

    got = _fwd_bwd(lambda a, b: rotary(a, b, cos, sin, cu_seqlens=cu, backend=backend), q, k, dq, dk)
    eager = _fwd_bwd(hf_style, q, k, dq, dk)
    exact = _fwd_bwd(hf_style, q.double(), k.double(), dq.double(), dk.double())
    for out, torch_out, ref in zip(got, eager, exact, strict=True):
        assert out.dtype == torch.bfloat16
        assert_low_precision_close(out, torch_out, ref, backend)


def test_matches_transformers_with_llama3_rope_scaling():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         rope_theta=500000.0)
    hf_rope = LlamaRotaryEmbedding(config)
    cos, sin = rope_cos_sin(hf_rope.inv_freq, 256, hf_rope.attention_scaling)
    lengths = [30, 1, 100]
    q, k, cu = _packed(lengths, 4, 2, 64)
    position_ids = positions_from_cu_seqlens(cu, q.shape[0])[None]
    hf_cos, hf_sin = hf_rope(q, position_ids)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    for backend in ("triton", "torch"):
        ours_q, ours_k = rotary(q, k, cos, sin, cu_seqlens=cu, backend=backend)
        torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_module_and_errors():
    rope = RotaryEmbedding(64, 32)
    q, k = torch.randn(5, 2, 64), torch.randn(5, 1, 64)
    qo, ko = rope(q, k)
    torch.testing.assert_close(qo, rotary(q, k, rope.cos, rope.sin, backend="torch")[0])
    with pytest.raises(ValueError, match="position_ids has 4 entries"):
        rotary(q, k, rope.cos, rope.sin, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="head_dim must be even"):
        rotary(q, k, rope.cos[:, :32], rope.sin[:, :32])


@pytest.mark.parametrize("backend", FUSED[1:])
def test_cpu_kernel_rejects_positions_past_the_table(backend):
    rope = RotaryEmbedding(64, 8)
    q, k = torch.randn(10, 2, 64), torch.randn(10, 1, 64)
    with pytest.raises(RuntimeError, match="outside the cos/sin table"):
        rotary(q, k, rope.cos, rope.sin, backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_strided_views_of_a_fused_qkv_projection(backend):
    dev = device_for(backend)
    t, hq, hk, d = 11, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=dev)
    q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = _tables(d, device=dev)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=dev)
    dq, dk = torch.randn(t, hq, d, device=dev), torch.randn(t, hk, d, device=dev)
    got = _fwd_bwd(lambda a, b: rotary(a, b, cos, sin, cu_seqlens=cu, backend=backend), q, k, dq, dk)
    want = _fwd_bwd(lambda a, b: rotary(a, b, cos, sin, cu_seqlens=cu, backend="torch"),
                    q.contiguous(), k.contiguous(), dq, dk)
    for out, ref in zip(got, want, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
