"""The decoder against transformers' own implementation, config by config.

Each tiny random checkpoint is built and saved by transformers; packtune loads it and must give
the same logits (fp32 and float64), the same per-sample logits and gradients on a packed batch,
the same greedy continuation, and an export transformers reloads to identical logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import CONFIGS, save_hf_model

from packtune.kernels import PackedLayout
from packtune.model.hf_io import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

NAMES = [n for n in CONFIGS if n != "llama_dynamic"]
LENGTHS = (7, 13, 20)  # a packed row of 3 samples; every sliding window above is shorter than two
# (and the longrope configs' original context, 10, lies between the first two: both factor sets)
GENERATED = [n for n in NAMES if "longrope" not in n]  # 5 + 14 tokens cross 10: see the longrope test


def _rms_norm_at_input_precision(self, x):
    """transformers' RMSNorm forwards (weight, or Gemma's 1 + weight), in float64 for float64 input
    (they always compute in fp32)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    if hasattr(self, "variance_epsilon"):
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)
    out = self._norm(x.to(compute)) * (1.0 + self.weight.to(compute))  # Gemma's
    return out.type_as(x)


def _eager_attention_at_input_precision(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                        softcap=None, **kwargs):
    """transformers' Gemma 2 eager attention, with its softmax in float64 for float64 input (it uses fp32)."""
    from transformers.models.gemma2.modeling_gemma2 import repeat_kv

    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    weights = query @ key.transpose(2, 3) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class _SoftmaxAtInputPrecision:
    """torch.nn.functional for transformers' BLOOM, whose attention softmax (dtype=float32) then
    keeps float64 for float64 input."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def softmax(x, dim, dtype=None):
        return F.softmax(x, dim, dtype=torch.promote_types(x.dtype, dtype or x.dtype))


def _router_at_input_precision(self, hidden_states):
    """transformers' softmax-then-top-k routers (Qwen3-MoE, OLMoE, Mixtral), with the softmax in float64
    for float64 input (they use fp32)."""
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    top, index = torch.topk(probs, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), index


@pytest.fixture(autouse=True)
def float64_hf_norms(monkeypatch):
    """packtune's norm, router softmax (and capped or ALiBi attention softmax) keep float64 for float64
    input; make transformers' do the same, so the float64 comparisons are between two exact
    computations, not exact vs fp32-rounded."""
    import sys

    from transformers.models.bloom import modeling_bloom
    from transformers.models.gemma2 import modeling_gemma2

    from packtune.model.families import families

    for family in families():
        modeling = sys.modules[getattr(transformers, family.architecture).__module__]
        for name, cls in vars(modeling).items():
            if name.endswith("RMSNorm") and isinstance(cls, type):
                monkeypatch.setattr(cls, "forward", _rms_norm_at_input_precision)
            if name.endswith("TopKRouter") and isinstance(cls, type) and name != "GptOssTopKRouter":
                monkeypatch.setattr(cls, "forward", _router_at_input_precision)
    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", _eager_attention_at_input_precision)
    monkeypatch.setattr(modeling_bloom, "F", _SoftmaxAtInputPrecision())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_hf_model(name, root / name) for name in CONFIGS}


def hf_model(path, dtype):
    """transformers' model; a mixture of experts runs its eager experts (its default, grouped_mm, takes
    no float64)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                             experts_implementation="eager").eval()


def assert_close_rel(actual, expected, rel):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} x max |expected| {scale:.3e}"


def packed_row(vocab, lengths, gen):
    samples = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return samples, torch.cat(samples), cu


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", NAMES)
def test_padded_logits_match_transformers(checkpoints, name, dtype, rel):
    hf = hf_model(checkpoints[name], dtype)
    ours = load_pretrained(checkpoints[name], dtype=dtype)
    ids = torch.randint(0, ours.args.vocab_size, (2, 19))
    with torch.no_grad():
        assert_close_rel(ours(ids), hf(ids).logits, rel)


@pytest.mark.parametrize("name", ["llama3_gqa", "qwen2"])
def test_bf16_error_no_worse_than_transformers(checkpoints, name):
    """bf16 logits: error vs the float64 model within transformers' own bf16 error + 1e-2."""
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        exact = hf_model(checkpoints[name], torch.float64)(ids).logits
        theirs = hf_model(checkpoints[name], torch.bfloat16)(ids).logits.double()
        ours = load_pretrained(checkpoints[name], dtype=torch.bfloat16)(ids).double()
    scale = exact.abs().max()
    assert (ours - exact).abs().max() / scale <= (theirs - exact).abs().max() / scale + 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_packed_logits_and_grads_match_each_sample_alone(checkpoints, name):
    """Packed [T] input == each sample run alone by transformers; loss gradients too (float64)."""
    dtype = torch.float64
    hf = hf_model(checkpoints[name], dtype)
    ours = load_pretrained(checkpoints[name], dtype=dtype)
    samples, ids, cu = packed_row(ours.args.vocab_size, LENGTHS, torch.Generator().manual_seed(1))

    logits = ours(ids, PackedLayout.from_cu_seqlens(cu))
    labels = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in samples])
    F.cross_entropy(logits, labels, reduction="sum").backward()

    hf_loss = 0
    for s, start in zip(samples, cu[:-1].tolist(), strict=True):
        hf_logits = hf(s[None]).logits[0]
        assert_close_rel(logits[start : start + len(s)].detach(), hf_logits.detach(), 1e-12)
        hf_loss = hf_loss + F.cross_entropy(hf_logits[:-1], s[1:], reduction="sum")
    hf_loss.backward()

    hf_grads = dict(hf.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert names == list(hf_grads), "parameter names differ from transformers'"
    for n, p in ours.named_parameters():
        assert_close_rel(p.grad, hf_grads[n].grad, 1e-10)


@pytest.mark.parametrize("name", ["mistral_window", "qwen3_gqa", "gemma2", "gemma3", "phi3", "bloom_6heads"])
def test_packed_fp32_grads_within_tolerance(checkpoints, name):
    """fp32: packed gradients within 1e-4 relative of transformers' per-sample gradients."""
    hf = hf_model(checkpoints[name], torch.float32)
    ours = load_pretrained(checkpoints[name], dtype=torch.float32)
    samples, ids, cu = packed_row(ours.args.vocab_size, LENGTHS, torch.Generator().manual_seed(2))
    labels = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in samples])
    F.cross_entropy(ours(ids, PackedLayout.from_cu_seqlens(cu)), labels, reduction="sum").backward()
    sum(F.cross_entropy(hf(s[None]).logits[0, :-1], s[1:], reduction="sum") for s in samples).backward()
    hf_params = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        assert_close_rel(p.grad, hf_params[n].grad, 1e-4)


def test_layout_from_lengths_equals_layout_from_offsets(checkpoints):
    ours = load_pretrained(checkpoints["llama3_gqa"])
    _, ids, cu = packed_row(ours.args.vocab_size, LENGTHS, torch.Generator().manual_seed(3))
    layout = PackedLayout.packed(LENGTHS)
    assert layout.positions.tolist() == torch.cat([torch.arange(n) for n in LENGTHS]).tolist()
    with torch.no_grad():
        derived = ours(ids, PackedLayout.from_cu_seqlens(cu))
        given = ours(ids, layout)
        hidden = ours.hidden_states(ids, layout)
    torch.testing.assert_close(given, derived, rtol=0, atol=0)
    torch.testing.assert_close(ours.lm_head(hidden), derived, rtol=0, atol=0)
    assert hidden.shape == (sum(LENGTHS), ours.args.hidden_size)


def test_dynamic_rope_beyond_max_positions(checkpoints):
    """Dynamic NTK scaling grows the base once a sequence passes max_position_embeddings (16 here)."""
    path = checkpoints["llama_dynamic"]
    ours = load_pretrained(path, dtype=torch.float64)
    for length in (12, 40):
        hf = hf_model(path, torch.float64)  # fresh: transformers' dynamic rope keeps state across calls
        ids = torch.randint(0, ours.args.vocab_size, (1, length))
        with torch.no_grad():
            assert_close_rel(ours(ids), hf(ids).logits, 1e-12)
    _, ids, cu = packed_row(ours.args.vocab_size, (10, 20), torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="dynamic rope scaling"):
        ours(ids, PackedLayout.from_cu_seqlens(cu))


@pytest.mark.parametrize("name", NAMES)
def test_export_reloads_in_transformers_with_identical_logits(checkpoints, tmp_path, name):
    hf = hf_model(checkpoints[name], torch.float32)
    ours = load_pretrained(checkpoints[name])
    save_pretrained(ours, tmp_path / "export")
    reloaded = hf_model(tmp_path / "export", torch.float32)
    ids = torch.randint(0, ours.args.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, rtol=0, atol=0)
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings


@pytest.mark.parametrize("name", GENERATED)
def test_greedy_generation_matches_transformers(checkpoints, name):
    from packtune.model.generate import generate

    hf = hf_model(checkpoints[name], torch.float64)
    ours = load_pretrained(checkpoints[name], dtype=torch.float64)
    prompt = torch.randint(3, ours.args.vocab_size, (5,), generator=torch.Generator().manual_seed(5))

    def hf_generate(eos, n):
        out = hf.generate(prompt[None], max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        return out[0, len(prompt) :].tolist()

    free = hf_generate(ours.args.vocab_size - 1, 14)  # an eos id generation is unlikely to hit first
    assert generate(ours, prompt, 14, eos_id=ours.args.vocab_size - 1) == free
    eos = free[6]  # stop at this token's first occurrence
    expected = hf_generate(eos, 14)
    assert expected[-1] == eos and len(expected) <= 7
    assert generate(ours, prompt, 14, eos_id=eos) == expected


@pytest.mark.parametrize("name", ["phi3_longrope", "phi3_longrope_mha"])
def test_longrope_generation_matches_transformers_or_refuses_the_crossing(checkpoints, name):
    """Greedy generation equals transformers' within either factor set: a prompt past the original
    context (10) uses the long factors throughout, a sequence that stays within it the short ones.
    Crossing it mid-generation (where transformers recomputes the cache) is refused by name."""
    from packtune.model.generate import generate

    hf = hf_model(checkpoints[name], torch.float64)
    ours = load_pretrained(checkpoints[name], dtype=torch.float64)
    eos = ours.args.vocab_size - 1
    gen = torch.Generator().manual_seed(6)
    for prompt_len, new in ((12, 9), (4, 6)):
        prompt = torch.randint(3, eos, (prompt_len,), generator=gen)
        out = hf.generate(prompt[None], max_new_tokens=new, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos)
        assert generate(ours, prompt, new, eos_id=eos) == out[0, prompt_len:].tolist()
    with pytest.raises(ValueError, match="longrope: generation crossing original_max_position_embeddings=10"):
        generate(ours, torch.randint(3, eos, (5,), generator=gen), 14, eos_id=eos)


def test_longrope_padded_rows_beyond_the_original_context_are_refused(checkpoints):
    ours = load_pretrained(checkpoints["phi3_longrope"], dtype=torch.float64)
    ids = torch.randint(0, ours.args.vocab_size, (2, 14))
    with pytest.raises(ValueError, match="longrope: padded rows 14 wide"):
        ours(ids, PackedLayout.padded([5, 14]))
    with torch.no_grad():  # rows within the original context need no lengths
        short = ids[:, :9]
        assert_close_rel(ours(short, PackedLayout.padded([9, 9])), ours(short), 0)
