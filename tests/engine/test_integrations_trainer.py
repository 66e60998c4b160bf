"""HF Trainer with PackedCollator, with and without apply_packtune: same losses, same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from model_fixtures import make_hf_model

from packtune.integrations import PackedCollator, apply_packtune

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _dataset(vocab: int, n: int = 24, seed: int = 0) -> list[dict]:
    """Prompt/response samples of varied lengths, so micro-batches hold different label counts."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt, response = (int(x) for x in torch.randint(1, 12, (2,), generator=gen))
        rows.append(
            {
                "prompt_ids": torch.randint(0, vocab, (prompt,), generator=gen).tolist(),
                "completion_ids": torch.randint(0, vocab, (response,), generator=gen).tolist(),
            }
        )
    return rows


def _train(model, data, out_dir, seen: list) -> list[float]:
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("num_items_in_batch")), with_kwargs=True
    )
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:6], data_collator=PackedCollator()
    )
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses + [trainer.evaluate()["eval_loss"]]


def test_trainer_with_and_without_packtune(tmp_path):
    """3 optimizer steps of 2 micro-batches: the patched model (fused loss over hidden states,
    varlen attention, packtune's norm/rotary/SwiGLU) logs the same losses and ends at the same
    weights as the original model on the same packed batches, both normalising by the Trainer's
    num_items_in_batch (the token count of the whole accumulation window). SGD, because Adam's
    first steps move each weight by about lr * sign(grad), which turns fp32 rounding in a
    near-zero gradient into a difference of lr and hides what this compares."""
    base = make_hf_model("llama3_gqa").float()
    base.config.use_cache = False
    data = _dataset(base.config.vocab_size)
    plain, patched = copy.deepcopy(base), copy.deepcopy(base)
    apply_packtune(patched)
    seen_plain, seen_patched = [], []
    losses_plain = _train(plain, data, tmp_path / "plain", seen_plain)
    losses_patched = _train(patched, data, tmp_path / "patched", seen_patched)
    assert len(losses_plain) == 3 + 1  # 3 steps, then the eval loss of the trained model
    counts = [int(c) for c in seen_patched[:6]]  # the training micro-batches
    assert len(seen_patched) > 6 and counts == [int(c) for c in seen_plain[:6]]
    assert counts[0] == counts[1] and counts[0] != counts[2], "one count per accumulation window"
    torch.testing.assert_close(torch.tensor(losses_patched), torch.tensor(losses_plain), rtol=1e-5, atol=0)
    moved = False
    for (name, p), q, b in zip(
        patched.named_parameters(), plain.parameters(), base.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        moved |= not torch.equal(p, b)
    assert moved, "training must change the weights"
