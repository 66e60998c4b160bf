"""The training loop in one process: the loss contract, the schedule, the NaN/inf guard."""

import json
import math
import os

import pytest
import torch
from toy_training import ListSampler, ToyLM, make_samples, packed, padded, tiny_gemma, tiny_llama, toy_steps

from packtune.config import TrainConfig
from packtune.data.packing import PackedBatch
from packtune.errors import TrainingError
from packtune.kernels import PackedLayout
from packtune.optim import warmup_cosine
from packtune.parallel import init_distributed
from packtune.train import Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared 2-core machine are 100x slower with two spinning OpenMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(tmp_path, steps, model=ToyLM, **overrides) -> Trainer:
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=1, lr=1e-2, warmup=0, max_grad_norm=0.0, log_every=1)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    quiet = open(os.devnull, "w")
    return Trainer(cfg, model(), ListSampler(steps), init_distributed("cpu"), log_stream=quiet)


def metrics(tmp_path):
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def flat_params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@pytest.mark.parametrize("weighting", ["token", "sample", "turn"])
def test_grad_accumulation_equals_one_big_batch(tmp_path, weighting):
    # Each step: 4 packed micro-batches of very different label counts vs. one row holding all of
    # them. A large Adam eps makes the update proportional to the gradient, so the weights
    # check the gradient's scale, not just its sign.
    samples = make_samples(4 * 3 * 4, seed=1, max_len=20, turns=1 if weighting == "token" else 3)
    groups = [samples[i : i + 3] for i in range(0, len(samples), 3)]
    split = [[packed(g, weighting) for g in groups[i : i + 4]] for i in range(0, len(groups), 4)]
    whole = [[packed([s for g in groups[i : i + 4] for s in g], weighting)] for i in range(0, len(groups), 4)]
    kw = dict(adam_eps=10.0, lr=1.0, loss_weighting=weighting)
    a = make_trainer(tmp_path / "a", split, **kw)
    b = make_trainer(tmp_path / "b", whole, **kw)
    assert a.fit() == b.fit() == 4
    for ra, rb in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b"), strict=False):
        assert ra["label_tokens"] == rb["label_tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    torch.testing.assert_close(flat_params(a), flat_params(b), rtol=0, atol=1e-5)
    other = make_trainer(tmp_path / "c", whole, loss_weighting=weighting)  # lr 1e-2, eps 1e-8
    assert not torch.equal(flat_params(a), flat_params(other))


def test_step_loss_is_global_token_mean(tmp_path):
    steps = toy_steps(1, micro_batches=3, per_micro=2, seed=3)
    trainer = make_trainer(tmp_path, steps)
    with torch.no_grad():
        logits_sum, count = 0.0, 0
        for b in steps[0]:
            hidden = trainer.model.hidden_states(b.input_ids, b.layout)
            logits = trainer.model.lm_head(hidden).double()
            logits_sum += torch.nn.functional.cross_entropy(logits, b.labels, reduction="sum").item()
            count += b.num_label_tokens
    trainer.fit()
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(logits_sum / count, rel=1e-5)


@pytest.mark.parametrize(
    "model, weighting",
    [(ToyLM, "token"), (tiny_llama, "token"), (lambda: tiny_llama(tied=True), "token"), (ToyLM, "sample"),
     (tiny_llama, "turn"), (tiny_gemma, "token")],
    ids=["toy", "llama", "llama-tied", "toy-sample", "llama-turn", "gemma"],
)
def test_packed_equals_padded(tmp_path, model, weighting):
    samples = make_samples(3 * 2 * 4, seed=2, max_len=16, turns=1 if weighting == "token" else 2)
    groups = [samples[i : i + 4] for i in range(0, len(samples), 4)]
    as_packed = [[packed(g, weighting) for g in groups[i : i + 2]] for i in range(0, len(groups), 2)]
    as_padded = [[padded(g, weighting) for g in groups[i : i + 2]] for i in range(0, len(groups), 2)]
    # Adam's g/sqrt(v) blows fp32 rounding up for near-zero gradients; a large eps keeps the
    # update proportional to the gradient, which is what the weight comparison is about.
    a = make_trainer(tmp_path / "a", as_packed, model, adam_eps=10.0, lr=1.0, loss_weighting=weighting)
    b = make_trainer(tmp_path / "b", as_padded, model, adam_eps=10.0, lr=1.0, loss_weighting=weighting)
    a.fit(), b.fit()
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb, strict=False):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["label_tokens"] == rb["label_tokens"] and ra["tokens"] < rb["tokens"]
    torch.testing.assert_close(flat_params(a), flat_params(b), rtol=0, atol=1e-5)


def per_token_losses(trainer, b):
    """Each sample's float64 token losses (label positions only, in order) of a packed toy batch,
    with the positions where a new turn (run of label tokens) starts."""
    with torch.no_grad():
        hidden = trainer.model.hidden_states(b.input_ids, b.layout)
        logits = trainer.model.lm_head(hidden).double()
    losses = torch.nn.functional.cross_entropy(logits, b.labels, reduction="none")
    bounds = b.layout.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        labels = b.labels[start:end].tolist()
        yield [(losses[start + t].item(), t == 0 or labels[t - 1] == -100)
               for t in range(end - start) if labels[t] != -100]


@pytest.mark.parametrize("weighting", ["sample", "turn"])
def test_step_loss_is_global_sample_or_turn_mean(tmp_path, weighting):
    # Written from the definition: the mean of per-sample (per-turn) mean token losses over every
    # sample (turn) of the step's micro-batches.
    steps = toy_steps(1, micro_batches=3, per_micro=2, seed=4, weighting=weighting, turns=3)
    trainer = make_trainer(tmp_path, steps, loss_weighting=weighting)
    means = []
    for b in steps[0]:
        for sample in per_token_losses(trainer, b):
            if weighting == "sample":
                groups = [[loss for loss, _ in sample]] if sample else []
            else:
                groups = []
                for loss, starts_turn in sample:
                    if starts_turn:
                        groups.append([])
                    groups[-1].append(loss)
            means += [sum(g) / len(g) for g in groups]
    assert sum(b.num_items for b in steps[0]) == len(means)
    assert (len(means) == 6) if weighting == "sample" else (len(means) > 6)  # 3 rows of 2 samples
    trainer.fit()
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(sum(means) / len(means), rel=1e-5)


def test_batches_of_another_weighting_are_refused(tmp_path):
    trainer = make_trainer(tmp_path, toy_steps(1, weighting="sample"))
    with pytest.raises(TrainingError, match="loss_weighting = 'token' but the batches"):
        trainer.fit()


def test_zero_label_tokens_gives_zero_loss_and_no_update(tmp_path):
    ids = torch.randint(0, 37, (6,))
    labels = torch.full((6,), -100)
    empty = PackedBatch(ids, labels, PackedLayout.packed([6], labels), 0, None)
    trainer = make_trainer(tmp_path, [[empty]])
    before = flat_params(trainer).clone()
    trainer.fit()
    (record,) = metrics(tmp_path)
    assert record["loss"] == 0.0 and record["grad_norm"] == 0.0 and not record["skipped"]
    assert torch.equal(flat_params(trainer), before)


def test_warmup_then_cosine():
    f = warmup_cosine(warmup_steps=3, total_steps=13)
    assert [f(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert f(3) == 1.0 and f(8) == pytest.approx(0.5) and f(13) == pytest.approx(0.0, abs=1e-12)
    g = warmup_cosine(0, 10, min_lr_ratio=0.1)
    assert g(0) == 1.0 and g(10) == pytest.approx(0.1)
    assert all(g(s) >= g(s + 1) for s in range(10))
    assert g(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_lr_in_metrics_follows_schedule(tmp_path):
    trainer = make_trainer(tmp_path, toy_steps(5), warmup=0.4, lr=1e-3)
    trainer.fit()
    f = warmup_cosine(2, 5)
    assert [r["lr"] for r in metrics(tmp_path)] == pytest.approx([1e-3 * f(s) for s in range(5)])


def inject_inf(trainer, at_steps):
    """Make the gradient of one weight infinite during the given steps."""
    weight = trainer.model.model.layers[0].up.weight
    weight.register_hook(lambda g: g * math.inf if trainer.step + 1 in at_steps else g)


def test_inf_gradient_step_is_skipped_and_reported(tmp_path, capsys):
    trainer = make_trainer(tmp_path, toy_steps(4))
    trainer.metrics.stream = None
    inject_inf(trainer, {2})
    snapshots = []
    step = trainer.train_step

    def snapshot_then_step(micro_batches, stop=False):
        snapshots.append(flat_params(trainer).clone())
        return step(micro_batches, stop)

    trainer.train_step = snapshot_then_step
    trainer.fit()
    records = metrics(tmp_path)
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert [r["skipped_total"] for r in records] == [0, 1, 1, 1]
    assert records[1]["grad_norm"] is None and math.isfinite(records[1]["loss"])
    assert torch.equal(snapshots[1], snapshots[2])  # step 2 changed nothing
    assert not torch.equal(snapshots[2], flat_params(trainer))
    assert trainer.optimizer.state[trainer.model.lm_head.weight]["step"].item() == 3
    assert "skipped 1" in capsys.readouterr().out


def test_too_many_bad_steps_in_a_row_abort(tmp_path):
    trainer = make_trainer(tmp_path, toy_steps(6), max_bad_steps=3)
    inject_inf(trainer, {2, 3, 4, 5})
    with pytest.raises(TrainingError, match="3 steps in a row.*max_bad_steps = 3.*step 4"):
        trainer.fit()


def test_eval_loss_is_held_out_token_mean(tmp_path):
    held_out = toy_steps(2, micro_batches=2, per_micro=2, seed=9)
    trainer = make_trainer(tmp_path, toy_steps(5), eval_every=2)
    trainer.eval_sampler = ListSampler(held_out)
    trainer.fit()
    evals = [r for r in metrics(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    total, count = 0.0, 0
    with torch.no_grad():
        for b in (b for mbs in held_out for b in mbs):
            hidden = trainer.model.hidden_states(b.input_ids, b.layout)
            logits = trainer.model.lm_head(hidden).double()
            total += torch.nn.functional.cross_entropy(logits, b.labels, reduction="sum").item()
            count += b.num_label_tokens
    assert evals[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert evals[-1]["eval_label_tokens"] == count


def test_fresh_run_starts_a_fresh_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    trainer = make_trainer(tmp_path, toy_steps(2))
    assert trainer.resume() is None
    trainer.fit()
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2] and metrics(tmp_path)[0]["loss"] != 9.0
