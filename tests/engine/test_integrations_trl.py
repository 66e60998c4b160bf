"""TRL's SFTTrainer with apply_packtune: packtune's fused loss runs on TRL's own loss path.

SFTTrainer does not ask the model for its loss: it installs a chunked LM head on `model.forward`
and calls `model(**inputs, fused_lm_head=True)`. apply_packtune(trainer.model), after the
trainer is built, answers that call with packtune's kernel; applied before, TRL's head bypasses
packtune and apply_packtune warns.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from model_fixtures import make_hf_model
from trl_fixtures import assert_same_adapters, lora_runs, word_tokenizer

from packtune.integrations import apply_packtune

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")


def _dataset(vocab: int, n: int = 24, seed: int = 0):
    """Already tokenized prompt + completion samples of varied lengths (TRL's processed format)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt, completion = (int(x) for x in torch.randint(1, 12, (2,), generator=gen))
        ids = torch.randint(2, vocab, (prompt + completion,), generator=gen).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * completion})
    return datasets.Dataset.from_list(rows)


def _trainer(model, out_dir, vocab: int, peft_config=None):
    args = trl.SFTConfig(
        output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, completion_only_loss=True, packing=True,
        packing_strategy="bfd", max_length=48, activation_checkpointing=False,
    )
    return trl.SFTTrainer(model=model, args=args, train_dataset=_dataset(vocab),
                          processing_class=word_tokenizer(vocab), peft_config=peft_config)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_runs_packtunes_loss_with_trls_losses(tmp_path, counted):
    """3 optimizer steps of 2 packed micro-batches: packtune's fused loss runs on each of the 6,
    and the logged losses and final weights equal TRL's own (its chunked head, no packtune)."""
    base = make_hf_model("llama3_gqa").float()
    base.config.use_cache = False
    vocab = base.config.vocab_size
    plain, patched = copy.deepcopy(base), copy.deepcopy(base)

    reference = _trainer(plain, tmp_path / "plain", vocab)
    reference.train()
    assert counted == []

    trainer = _trainer(patched, tmp_path / "patched", vocab)
    apply_packtune(trainer.model)  # after SFTTrainer installed its LM head on model.forward
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="apply_packtune")
        trainer.train()
    assert counted == ["none"] * 6, "packtune's fused loss once per micro-batch"

    assert len(_losses(reference)) == 3
    torch.testing.assert_close(torch.tensor(_losses(trainer)), torch.tensor(_losses(reference)),
                               rtol=1e-5, atol=0)
    metrics = ("entropy", "mean_token_accuracy")  # TRL's, from the patched forward's outputs
    history = {k: v for k, v in trainer.state.log_history[0].items() if k in metrics}
    expected = {k: v for k, v in reference.state.log_history[0].items() if k in metrics}
    assert len(history) == 2 and history == pytest.approx(expected, rel=1e-4)
    for (name, p), q in zip(patched.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_applied_before_sft_trainer_warns_once(tmp_path, counted):
    """TRL's head wraps the patched forward and calls the base model itself: packtune's fused loss
    never runs, and apply_packtune says so (once) with the fix."""
    model = make_hf_model("llama3_gqa").float()
    model.config.use_cache = False
    apply_packtune(model)
    trainer = _trainer(model, tmp_path / "run", model.config.vocab_size)
    with pytest.warns(UserWarning, match="fused_loss and packed did not run") as record:
        trainer.train()
    assert len([w for w in record if "apply_packtune" in str(w.message)]) == 1
    assert "apply_packtune(trainer.model) after building the trainer" in str(record[0].message)
    assert counted == []


def test_sft_trainer_with_peft_runs_packtunes_lora_kernels(tmp_path, counted, monkeypatch):
    """TRL's LoRA path (SFTTrainer with a peft_config): after apply_packtune the LoRA layers run
    packtune's fused LoRA linear / MLP on PEFT's parameters, and the losses and trained adapters
    equal TRL + PEFT's own."""
    import packtune.integrations.peft_lora as peft_lora

    fused = []
    for name in ("lora_linear", "lora_mlp"):
        original = getattr(peft_lora, name)
        counting = lambda *a, _n=name, _o=original, **k: fused.append(_n) or _o(*a, **k)  # noqa: E731
        monkeypatch.setattr(peft_lora, name, counting)
    reference, trainer = lora_runs(_trainer, tmp_path)
    layers = trainer.model.config.num_hidden_layers
    assert counted == ["none"] * 6 and fused == (["lora_linear"] * 4 + ["lora_mlp"]) * layers * 6
    torch.testing.assert_close(torch.tensor(_losses(trainer)), torch.tensor(_losses(reference)),
                               rtol=1e-5, atol=0)
    assert_same_adapters(trainer.model, reference.model)
