"""TRL's GRPOTrainer, RLOOTrainer and KTOTrainer with apply_packtune: the policy's log-probs come from
packtune's kernel (GRPO's and RLOO's at their sampling temperature), and TRL's losses and trained
weights are its own."""

from __future__ import annotations

import copy

import pytest
import torch
from model_fixtures import make_hf_model
from trl_fixtures import word_tokenizer

from packtune.integrations import apply_packtune

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

COMMON = dict(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, optim="sgd",
              learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
              save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, data_seed=0,
              dataloader_num_workers=0, disable_tqdm=True)


def _text(gen, vocab, length):
    return " ".join(f"w{int(i)}" for i in torch.randint(2, vocab, (length,), generator=gen))


def _assert_same_run(trainer, reference, keys):
    got = [{k: v for k, v in h.items() if k in keys} for h in trainer.state.log_history[:2]]
    want = [{k: v for k, v in h.items() if k in keys} for h in reference.state.log_history[:2]]
    assert len(want) == 2 and all(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-6)
    moved = False
    for (name, p), q, start in zip(trainer.model.named_parameters(), reference.model.parameters(),
                                   trainer.start_weights, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        moved |= not torch.equal(p, start)
    assert moved, "training changed the weights"


def _sampling_trainer(kind: str, model_dir, out_dir, vocab):
    """GRPO or RLOO on 8 prompts, 4 completions each sampled at temperature 0.7, with a KL term to the
    reference (loaded from the same directory)."""
    gen = torch.Generator().manual_seed(0)
    prompts = datasets.Dataset.from_list([{"prompt": _text(gen, vocab, 4)} for _ in range(8)])

    def reward(completions, **kwargs):  # prefer short completions, and ones with even-numbered words
        return [-len(c.split()) + sum(int(w[1:]) % 2 == 0 for w in c.split()) for c in completions]

    config, trainer_class = (trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo" else (trl.RLOOConfig,
                                                                                      trl.RLOOTrainer)
    args = config(output_dir=str(out_dir), num_generations=4, max_completion_length=6, temperature=0.7,
                  beta=0.04, **COMMON)
    trainer = trainer_class(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=prompts,
                            processing_class=word_tokenizer(vocab))
    trainer.start_weights = [p.detach().clone() for p in trainer.model.parameters()]
    return trainer


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_sampling_trainers_at_their_temperature(tmp_path, counted, kind):
    """2 GRPO / RLOO steps: the same completions, rewards, losses and weights with packtune as
    without (the policy's log-probs at the sampling temperature)."""
    base = make_hf_model("llama3_gqa").float()
    base.save_pretrained(tmp_path / "base")
    vocab = base.config.vocab_size
    torch.manual_seed(0)
    reference = _sampling_trainer(kind, tmp_path / "base", tmp_path / "plain", vocab)
    reference.train()
    assert counted == []
    torch.manual_seed(0)
    trainer = _sampling_trainer(kind, tmp_path / "base", tmp_path / "patched", vocab)
    apply_packtune(trainer.model)
    trainer.train()
    assert counted, "packtune's kernel gave the policy's log-probs"
    _assert_same_run(trainer, reference, ("loss", "reward", "reward_std", "kl", "entropy",
                                          "completions/mean_length"))


def _kto(model, out_dir, vocab):
    gen = torch.Generator().manual_seed(0)
    rows = [{"prompt": _text(gen, vocab, 3), "completion": f" {_text(gen, vocab, 4)} w1", "label": i % 2 == 0}
            for i in range(8)]
    args = trl.KTOConfig(output_dir=str(out_dir), beta=0.1, max_length=None, disable_dropout=True, **COMMON)
    data = datasets.Dataset.from_list(rows)
    trainer = trl.KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                             processing_class=word_tokenizer(vocab))
    trainer.start_weights = [p.detach().clone() for p in model.parameters()]
    return trainer


def test_kto_trainer(tmp_path, counted):
    """2 KTO steps on desirable and undesirable completions: losses, rewards, logits metrics and weights
    equal TRL's own."""
    base = make_hf_model("llama3_gqa").float()
    base.config.use_cache = False
    vocab = base.config.vocab_size
    reference = _kto(copy.deepcopy(base), tmp_path / "plain", vocab)
    reference.train()
    trainer = _kto(copy.deepcopy(base), tmp_path / "patched", vocab)
    apply_packtune(trainer.model)
    trainer.train()
    assert counted, "packtune's kernel gave the policy's log-probs"
    keys = {k for k in reference.state.log_history[0] if k.startswith(("rewards/", "logps/", "logits/"))}
    _assert_same_run(trainer, reference, ("loss", *keys))
