"""T5 against transformers' own implementation, on rows packed as T5X packs them.

Each tiny random checkpoint (t5_fixtures: T5 v1.1, the original T5, mT5 untied and tied) is built and
saved by transformers; packtune loads it and must give, for a packed row of pairs of very different
lengths (1 to 30 tokens, past the bias' max distance), each pair's logits and the parameter gradients
of transformers running that pair alone (float64); the fused loss on the decoder's hidden states must
equal transformers' loss summed per pair; an export must reload in transformers to identical logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from t5_fixtures import T5_CONFIGS, save_hf_t5

from packtune.errors import ModelError
from packtune.kernels import linear_cross_entropy
from packtune.model.config import ModelArgs
from packtune.model.hf_io import checkpoint_args, load_pretrained, save_pretrained
from packtune.model.t5_batch import pack_pairs

transformers = pytest.importorskip("transformers")

PAIR_LENGTHS = [(7, 5), (1, 12), (30, 1), (3, 8), (1, 1), (22, 19)]  # (input, target) tokens per pair


def _norm_at_input_precision(self, x):
    """transformers' T5 norm with its variance at the input's precision (it always takes fp32), so the
    float64 comparisons are between two exact computations, not exact vs fp32-rounded."""
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * normed.to(x.dtype)


@pytest.fixture(autouse=True)
def float64_hf_norms(monkeypatch):
    from transformers.models.mt5 import modeling_mt5
    from transformers.models.t5 import modeling_t5

    monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", _norm_at_input_precision)
    monkeypatch.setattr(modeling_mt5.MT5LayerNorm, "forward", _norm_at_input_precision)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    return {name: save_hf_t5(name, root / name) for name in T5_CONFIGS}


def hf_model(path, dtype):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype).eval()


def assert_close_rel(actual, expected, rel):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} x max |expected| {scale:.3e}"


def random_pairs(vocab, lengths=PAIR_LENGTHS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(2, vocab, (n,), generator=gen).tolist()
    return [(draw(n), draw(m)) for n, m in lengths]


def hf_pair_logits(hf, source, target):
    """transformers on one pair alone: its logits (decoder inputs: the target shifted right)."""
    return hf(input_ids=torch.tensor([source]), labels=torch.tensor([target])).logits[0]


@pytest.mark.parametrize("name", T5_CONFIGS)
def test_args_follow_transformers_tie_and_scale(checkpoints, name):
    args = checkpoint_args(checkpoints[name])
    hf = hf_model(checkpoints[name], torch.float32)
    assert args.tie_word_embeddings == (hf.lm_head.weight is hf.shared.weight)
    assert args.scale_decoder_outputs == bool(getattr(hf.config, "scale_decoder_outputs", False))
    assert (args.num_hidden_layers, args.num_decoder_layers, args.head_dim) == (2, 3, 12)


@pytest.mark.parametrize("name", T5_CONFIGS)
def test_packed_logits_and_grads_match_each_pair_alone(checkpoints, name):
    """One packed row of six pairs == transformers on each pair alone: logits (1e-10) and the gradients
    of the summed cross-entropy (1e-8), float64."""
    hf = hf_model(checkpoints[name], torch.float64)
    ours = load_pretrained(checkpoints[name], dtype=torch.float64)
    pairs = random_pairs(ours.args.vocab_size)
    batch = pack_pairs(pairs, ours.args.decoder_start_token_id)
    logits = ours(batch.input_ids, batch.decoder_input_ids, batch.layout)
    F.cross_entropy(logits, batch.labels, reduction="sum").backward()

    hf_loss = 0
    for (source, target), start in zip(pairs, batch.layout.decoder.cu_seqlens.tolist(), strict=False):
        expected = hf_pair_logits(hf, source, target)
        assert_close_rel(logits[start : start + len(target)].detach(), expected.detach(), 1e-10)
        hf_loss = hf_loss + F.cross_entropy(expected, torch.tensor(target), reduction="sum")
    hf_loss.backward()

    hf_params = dict(hf.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert names == list(hf_params), "parameter names differ from transformers'"
    for n, p in ours.named_parameters():
        assert_close_rel(p.grad, hf_params[n].grad, 1e-8)


@pytest.mark.parametrize("dtype, rel, grad_rel", [(torch.float64, 1e-6, 1e-6), (torch.float32, 1e-5, 1e-4)])
@pytest.mark.parametrize("name", ["t5_v11", "t5_original"])  # an own head unscaled; the tied head scaled
def test_fused_loss_equals_transformers_loss_summed_per_pair(checkpoints, name, dtype, rel, grad_rel):
    """packtune's fused linear cross-entropy on the decoder's (scaled) hidden states, reduction sum, ==
    transformers' mean loss x target length summed over the pairs; its gradients too. (The fused kernel
    keeps its per-row losses and dW in fp32 whatever the input: float64 agrees to fp32's precision.)"""
    hf = hf_model(checkpoints[name], dtype)
    ours = load_pretrained(checkpoints[name], dtype=dtype)
    pairs = random_pairs(ours.args.vocab_size, seed=1)
    batch = pack_pairs(pairs, ours.args.decoder_start_token_id)
    hidden = ours.hidden_states(batch.input_ids, batch.decoder_input_ids, batch.layout)
    loss = linear_cross_entropy(hidden, ours.lm_head, batch.labels, layout=batch.layout.decoder,
                                reduction="sum")
    loss.backward()
    expected = sum(hf(input_ids=torch.tensor([s]), labels=torch.tensor([t])).loss * len(t) for s, t in pairs)
    expected.backward()
    assert_close_rel(loss.detach(), expected.detach(), rel)
    hf_params = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        assert_close_rel(p.grad, hf_params[n].grad, grad_rel)


@pytest.mark.parametrize("name", T5_CONFIGS)
def test_export_reloads_in_transformers_with_identical_logits(checkpoints, tmp_path, name):
    ours = load_pretrained(checkpoints[name], dtype=torch.float32)
    out = save_pretrained(ours, tmp_path / "export")
    stored = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not ours.args.tie_word_embeddings)
    assert sorted(stored) == sorted(k for k in ours.state_dict() if k in stored)
    source = torch.randint(2, 96, (2, 13))
    target = torch.randint(2, 96, (2, 9))
    with torch.no_grad():
        before = hf_model(checkpoints[name], torch.float32)(input_ids=source, labels=target).logits
        after = hf_model(out, torch.float32)(input_ids=source, labels=target).logits
    assert torch.equal(before, after)
    again = load_pretrained(out)
    assert again.args == ours.args and again.args.model_type == ours.args.model_type


def test_flan_t5_style_checkpoint(checkpoints, tmp_path):
    """A checkpoint as the FLAN-T5 repositories hold it: `tie_word_embeddings: false` without
    `scale_decoder_outputs`, the embedding also stored under the stacks' names, and the unused
    cross-attention bias table of old checkpoints: read as transformers reads it."""
    path = tmp_path / "flan"
    path.mkdir()
    config = json.loads((checkpoints["t5_v11"] / "config.json").read_text())
    config.pop("scale_decoder_outputs")
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    tensors = load_file(checkpoints["t5_v11"] / "model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"]
    tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.randn(8, 4)
    tensors = {k: v.clone() for k, v in tensors.items()}  # safetensors stores no shared memory
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ours = load_pretrained(path, dtype=torch.float64)
    assert not ours.args.tie_word_embeddings and not ours.args.scale_decoder_outputs
    pairs = random_pairs(96, [(9, 4), (25, 6)], seed=2)
    batch = pack_pairs(pairs, 0)
    hf = hf_model(path, torch.float64)
    with torch.no_grad():
        logits = ours(batch.input_ids, batch.decoder_input_ids, batch.layout)
        expected = torch.cat([hf_pair_logits(hf, s, t) for s, t in pairs])
    assert_close_rel(logits, expected, 1e-10)


def test_encoder_decoder_pairs_do_not_see_each_other(checkpoints):
    """A pair's logits do not depend on the other pairs of its row (their inputs or targets)."""
    ours = load_pretrained(checkpoints["t5_v11"], dtype=torch.float64)
    pairs = random_pairs(96)
    changed = [(s, t) if i == 2 else ([5] * len(s), [7] * len(t)) for i, (s, t) in enumerate(pairs)]
    batches = [pack_pairs(p, 0) for p in (pairs, changed)]
    with torch.no_grad():
        a, b = (ours(x.input_ids, x.decoder_input_ids, x.layout) for x in batches)
    cu = batches[0].layout.decoder.cu_seqlens.tolist()
    assert torch.equal(a[cu[2] : cu[3]], b[cu[2] : cu[3]]) and not torch.equal(a, b)


def test_init_weights_follow_t5_init():
    from packtune.model.families import build_model

    args = ModelArgs.from_hf_config({
        "model_type": "t5", "vocab_size": 300, "d_model": 256, "d_kv": 32, "d_ff": 512, "num_layers": 2,
        "num_heads": 8, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "tie_word_embeddings": False, "initializer_factor": 2.0})
    model = build_model(args)
    model.init_weights(torch.Generator().manual_seed(0))
    attention = model.encoder.block[0].layer[0].SelfAttention
    wo = model.decoder.block[1].layer[2].DenseReluDense.wo.weight
    expected = {attention.q.weight: 2 * (256 * 32) ** -0.5, attention.k.weight: 2 * 256 ** -0.5,
                attention.o.weight: 2 * (8 * 32) ** -0.5, wo: 2 * 512 ** -0.5, model.shared.weight: 2.0,
                model.lm_head.weight: 2.0}
    for weight, std in expected.items():
        assert abs(weight.std().item() / std - 1) < 0.05
    assert model.decoder.final_layer_norm.weight.eq(2.0).all()


@pytest.mark.parametrize("key, value, message", [
    ("feed_forward_proj", "gated-silu", "feed_forward_proj='gated-silu' is not supported"),
    ("num_heads", 0, "num_heads must be a positive integer"),
    ("quantization_config", {"bits": 4}, "config option 'quantization_config' is not supported"),
])
def test_unsupported_config_raises_one_clear_error(checkpoints, key, value, message):
    config = json.loads((checkpoints["t5_v11"] / "config.json").read_text())
    with pytest.raises(ModelError, match=message):
        ModelArgs.from_hf_config({**config, key: value})


@pytest.mark.parametrize("name", ["t5_v11", "t5_original"])
def test_flops_count_the_parameters_each_token_passes_through(checkpoints, name):
    """pair_flops == 6 x (the encoder's parameters per input token, the decoder's and the head's per
    target token, the cross-attention k/v per input token) + the attention term, from the modules."""
    from packtune.model.families.t5 import pair_flops

    model = load_pretrained(checkpoints[name])
    count = lambda module: sum(p.numel() for p in module.parameters())
    table = lambda stack: count(stack.block[0].layer[0].SelfAttention.relative_attention_bias)  # no matmul
    cross_kv = sum(count(b.layer[1].EncDecAttention.k) + count(b.layer[1].EncDecAttention.v)
                   for b in model.decoder.block)
    encoder = count(model.encoder) - table(model.encoder) + cross_kv
    decoder = count(model.decoder) - table(model.decoder) - cross_kv + count(model.lm_head)
    a = model.args
    inner, n, m = a.num_attention_heads * a.head_dim, 11, 5
    attention = 12 * inner * (a.num_hidden_layers * n * n + a.num_decoder_layers * m * (m + n))
    expected = 6 * (n * encoder + m * decoder) + attention
    assert pair_flops(a, n, m) == expected
    assert a.num_flops_per_token(8) == pair_flops(a, 8, 8) // 16


def test_seq2seq_loss_divides_the_summed_loss_by_num_items(checkpoints):
    """Seq2SeqLoss (what a training step calls) == transformers' loss summed over the pairs / num_items."""
    from packtune.seq2seq_loss import Seq2SeqLoss

    hf = hf_model(checkpoints["t5_original"], torch.float32)
    ours = load_pretrained(checkpoints["t5_original"], dtype=torch.float32)
    pairs = random_pairs(ours.args.vocab_size, seed=3)
    batch = pack_pairs(pairs, ours.args.decoder_start_token_id)
    num_items = torch.tensor(80.0)  # e.g. the step's label tokens over all micro-batches and ranks
    loss = Seq2SeqLoss(ours)(batch.input_ids, batch.labels, batch.layout, num_items,
                             decoder_input_ids=batch.decoder_input_ids)
    with torch.no_grad():
        expected = sum(hf(input_ids=torch.tensor([s]), labels=torch.tensor([t])).loss * len(t)
                       for s, t in pairs)
    assert_close_rel(loss.detach(), expected / 80, 1e-5)
