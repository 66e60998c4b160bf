"""TRL's DPOTrainer with apply_packtune: the per-token log-probs DPO sums per sequence come from
packtune's fused linear cross-entropy, and TRL's losses, metrics and trained weights are its own.

Like SFTTrainer, DPOTrainer (1.16) installs TRL's chunked LM head and calls
`model(..., fused_lm_head=True)`; it also reads `mean_logits` (its logits/chosen and
logits/rejected metrics) and, for WPO, `log_sum_sq_probs`. apply_packtune(trainer.model), after
the trainer is built, answers those calls on the policy; a separate reference model (the policy as
it starts, given explicitly: TRL would load it from the hub by name) keeps TRL's head, and with
PEFT the reference is the policy with its adapters disabled, answered by packtune too.
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

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


def _pairs(vocab: int, n: int = 12, seed: int = 0):
    """Standard-format preference records of varied lengths; responses end with EOS already."""
    gen = torch.Generator().manual_seed(seed)

    def text(length):
        return " ".join(f"w{int(i)}" for i in torch.randint(2, vocab, (length,), generator=gen))

    rows = []
    for _ in range(n):
        p, c, r = (int(x) for x in torch.randint(1, 9, (3,), generator=gen))
        rows.append({"prompt": text(p), "chosen": f" {text(c)} w1", "rejected": f" {text(r)} w1"})
    return datasets.Dataset.from_list(rows)


def _trainer(model, out_dir, vocab: int, peft_config=None, **config):
    args = trl.DPOConfig(
        output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, data_seed=0, beta=0.1,
        dataloader_num_workers=0, disable_tqdm=True, max_length=None, disable_dropout=True, **config,
    )
    ref_model = None if peft_config else copy.deepcopy(model)  # with PEFT: the adapters disabled
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_pairs(vocab),
                          processing_class=word_tokenizer(vocab), peft_config=peft_config)


def _logged(trainer) -> list[dict[str, float]]:
    """The loss and TRL's DPO metrics of the first 3 logged steps."""
    return [{k: v for k, v in h.items() if k in ("loss", *METRICS)} for h in trainer.state.log_history[:3]]


@pytest.mark.parametrize(("config", "patch_reference"),
                         [({}, False), ({"loss_type": ["sigmoid", "sft"]}, False),
                          ({"use_weighting": True}, False), ({}, True)],
                         ids=["sigmoid", "rpo", "wpo", "reference_too"])
def test_dpo_trainer_runs_packtunes_log_probs_with_trls_losses(tmp_path, counted, config, patch_reference):
    """3 optimizer steps of 2 micro-batches of 2 pairs: packtune's kernel gives the policy's per-token
    log-probs in each of the 6, and the logged losses, TRL's metrics and the final weights equal
    TRL's own (its chunked head, no packtune); also with an SFT term (RPO) and with WPO's weights
    (which read log_sum_sq_probs; TRL 1.16's own step fails with both at once). TRL 1.16's
    DPOTrainer turns `padding_free=True` back into padding, so its rows are padded here. With
    `apply_packtune(trainer.ref_model)` as well, the reference's forwards run packtune too."""
    base = make_hf_model("llama3_gqa").float()
    base.config.use_cache = False
    vocab = base.config.vocab_size
    plain, patched = copy.deepcopy(base), copy.deepcopy(base)

    reference = _trainer(plain, tmp_path / "plain", vocab, **config)
    reference.train()
    assert counted == []

    trainer = _trainer(patched, tmp_path / "patched", vocab, **config)
    apply_packtune(trainer.model)  # after DPOTrainer installed its LM head on model.forward
    if patch_reference:
        apply_packtune(trainer.ref_model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="apply_packtune")
        trainer.train()
    forwards = 12 if patch_reference else 6  # the policy's, and the reference's, once per micro-batch
    assert counted == ["none"] * forwards, "packtune's kernel in every forward it was applied to"

    got, want = _logged(trainer), _logged(reference)
    assert len(want) == 3 and all(len(w) == len(METRICS) + 1 for w in want)
    assert want[2]["loss"] != want[0]["loss"], "the policy moved"
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-6)
    for (name, p), q in zip(patched.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_dpo_trainer_with_peft_runs_packtune_for_policy_and_reference(tmp_path, counted):
    """DPO with LoRA (TRL's reference is the policy with its adapters disabled): both forwards of each
    micro-batch run packtune's kernel, and the losses, metrics and trained adapters equal TRL + PEFT's."""
    reference, trainer = lora_runs(_trainer, tmp_path)
    assert counted == ["none"] * 12, "policy and reference, once each per micro-batch"
    got, want = _logged(trainer), _logged(reference)
    assert len(want) == 3 and want[2]["loss"] != want[0]["loss"]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-6)
    assert_same_adapters(trainer.model, reference.model)
