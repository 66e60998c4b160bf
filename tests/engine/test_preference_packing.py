"""Packed pairs (packtune.preference.packing): every pair whole in one row, and the three layouts
(prompts shared, prompts packed twice, padded pairs) giving the same per-pair log-probs, losses and
gradients on packtune's Llama (fp32), to 1e-6 relative."""

import numpy as np
import pytest
import torch
from data_fixtures import trained_tokenizers, write_jsonl
from preference_fixtures import pair_records
from toy_training import tiny_llama, tiny_moe

from packtune.config import DataConfig, PreferenceConfig
from packtune.data import prepare_dataset
from packtune.kernels import IGNORE_INDEX
from packtune.preference.loss import PreferenceLoss
from packtune.preference.objectives import step_loss
from packtune.preference.packing import PackedPairRows, PaddedPairRows, pair_units

N_PAIRS = 9


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    sp = trained_tokenizers(tmp_path_factory)["sp"]
    path = write_jsonl(tmp / "pairs.jsonl", pair_records(N_PAIRS, "conversational", seed=4, max_words=8))
    cfg = DataConfig(path=str(path), template="alpaca", tokenizer=str(sp), num_workers=1, max_tokens=1000)
    return prepare_dataset(cfg, use_cache=False)


def test_every_pair_is_whole_in_one_row(pairs):
    for shared in (False, True):
        rows = PackedPairRows.packed(pairs, 1000, shared)
        seen = np.concatenate([rows.pairs(r) for r in range(len(rows))])
        assert sorted(seen.tolist()) == list(range(N_PAIRS))
        assert (rows.row_tokens <= 1000).all() and rows.efficiency > 0.5
        split = rows.with_row_multiple(5)
        assert len(split) % 5 == 0
        assert sorted(np.concatenate([split.pairs(r) for r in range(len(split))])) == list(range(N_PAIRS))
        for r in range(len(rows)):
            batch = rows.collate(r)
            assert batch.num_items == len(rows.pairs(r)) and batch.input_ids.numel() == rows.row_tokens[r]


def test_shared_rows_save_prompt_minus_one_tokens_per_pair(pairs):
    saved = (pair_units(pairs, False) - pair_units(pairs, True)).tolist()
    assert saved == (pairs.prompt_lengths - 1).tolist()
    rows = PackedPairRows.packed(pairs, 1000, shared=True)
    assert rows.shared_tokens_saved == int((pairs.prompt_lengths - 1).sum())


def _logps_and_grads(model, batches, objective="dpo"):
    """Per-pair log-probs, the step's loss and the parameters' gradients over `batches` (one step)."""
    cfg = PreferenceConfig(beta=0.5, sft_weight=0.3)
    loss_module = PreferenceLoss(model, objective, cfg)
    model.zero_grad()
    num_pairs = torch.tensor(float(sum(b.num_items for b in batches)))
    chosen = torch.tensor(float(sum(b.chosen_tokens for b in batches)))
    logps, loss = torch.zeros(N_PAIRS, 2, dtype=torch.float64), 0.0
    for b in batches:
        out, counts = loss_module.logps(b.input_ids, b.labels, b.layout)
        share, _ = step_loss(objective, cfg, out, counts, b.ref_logps, num_pairs, chosen)
        share.backward()
        loss += share.item()
        logps[torch.from_numpy(b.pairs)] = out.detach().double()
    return logps, loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_shared_unshared_and_padded_layouts_agree(pairs):
    model = tiny_llama(vocab=600, seed=1, max_position_embeddings=1024)
    ref = np.random.default_rng(0).normal(-40, 5, size=(N_PAIRS, 2))
    results = {}
    for name, rows in {"shared": PackedPairRows.packed(pairs, 1000, True),
                       "unshared": PackedPairRows.packed(pairs, 1000, False),
                       "padded": PaddedPairRows.random_groups(pairs, 4)}.items():
        rows.ref_logps = ref
        results[name] = _logps_and_grads(model, [rows.collate(r) for r in range(len(rows))])
    base_logps, base_loss, base_grads = results["unshared"]
    for name in ("shared", "padded"):
        logps, loss, grads = results[name]
        torch.testing.assert_close(logps, base_logps, rtol=1e-6, atol=0)
        assert loss == pytest.approx(base_loss, rel=1e-6)
        for key, grad in grads.items():
            assert (grad - base_grads[key]).norm() <= 1e-6 * base_grads[key].norm(), (name, key)
    one_pair = pairs.sample(0)[0].astype(np.int64)  # the per-pair log-probs are each side's own
    labels = np.where(pairs.sample(0)[1], one_pair, IGNORE_INDEX)
    with torch.no_grad():
        logits = model(torch.from_numpy(one_pair)[None])[0, :-1].double().log_softmax(-1)
    target = torch.from_numpy(labels[1:])
    alone = logits.gather(1, target.clamp(min=0)[:, None])[:, 0][target != IGNORE_INDEX].sum()
    torch.testing.assert_close(base_logps[0, 0], alone.double(), rtol=1e-6, atol=0)


def test_shared_layout_attends_like_two_samples(pairs):
    rows = PackedPairRows.packed(pairs, 1000, True)
    batch = rows.collate(0)
    layout, first = batch.layout, rows.pairs(0)[0]
    n = int(pairs.prompt_lengths[first])
    chosen, rejected = (len(pairs.sample(2 * first + k)[0]) for k in (0, 1))
    cu, cu_k = layout.cu_seqlens.tolist(), layout.keys.cu_seqlens_k.tolist()
    assert cu[1] - cu[0] == chosen and cu[2] - cu[1] == rejected - (n - 1)
    assert cu_k[1] == chosen and cu_k[2] - cu_k[1] == rejected
    keys = layout.keys.index[cu_k[1]:cu_k[2]].tolist()
    assert keys == list(range(n - 1)) + list(range(chosen, chosen + rejected - n + 1))
    assert layout.positions[cu[1]:cu[2]].tolist() == list(range(n - 1, rejected))
    multiplicity = layout.keys.multiplicity[:cu[2]].tolist()  # the samples each token stands for
    assert multiplicity == [2.0] * (n - 1) + [1.0] * (chosen - n + 1 + rejected - n + 1)


def test_mixture_of_experts_router_losses_agree_across_layouts(pairs):
    """A mixture of experts' DPO loss with its router losses: a shared prompt counts twice in the
    router load (its two samples'), so the three layouts of one micro-batch give the same loss,
    router statistics and gradients."""
    model = tiny_moe(vocab=600, seed=1, max_position_embeddings=1024)
    ref = torch.from_numpy(np.random.default_rng(0).normal(-40, 5, size=(N_PAIRS, 2)))
    results = {}
    for name, rows in {"shared": PackedPairRows.packed(pairs, 4000, True),
                       "unshared": PackedPairRows.packed(pairs, 4000, False),
                       "padded": PaddedPairRows.random_groups(pairs, N_PAIRS)}.items():
        (batch,) = [rows.collate(r) for r in range(len(rows))]  # one micro-batch of every pair
        module = PreferenceLoss(model, "dpo", PreferenceConfig(beta=0.5), aux_coef=0.5, z_coef=0.1)
        model.zero_grad()
        num_items = torch.tensor([float(batch.num_items), float(batch.chosen_tokens)])
        loss, _ = module(batch.input_ids, batch.labels, batch.layout, num_items=num_items,
                         ref_logps=ref[torch.from_numpy(batch.pairs)].float(), router_weight=1.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[name] = (loss.item(), module.router_stats, grads)
    base_loss, (base_terms, base_counts), base_grads = results["unshared"]
    assert base_terms[0] > 0 and base_counts.sum() > 0
    for name in ("shared", "padded"):
        loss, (terms, counts), grads = results[name]
        assert loss == pytest.approx(base_loss, rel=1e-6), name
        torch.testing.assert_close(terms, base_terms, rtol=1e-5, atol=0)
        assert torch.equal(counts, base_counts), name
        for key, grad in grads.items():
            assert (grad - base_grads[key]).norm() <= 1e-5 * base_grads[key].norm(), (name, key)
