"""apply_packtune on a PEFT-wrapped transformers model (how TRL runs LoRA): packed == unpacked with
the adapters' gradients, and an exact undo through the wrapper."""

from __future__ import annotations

import copy

import pytest
import torch
from model_fixtures import make_hf_model
from test_integrations_transformers import _per_sample_reference, _samples

from packtune.integrations import PackedCollator, UnsupportedModelError, apply_packtune, remove_packtune

peft = pytest.importorskip("peft")


def _peft_model(name: str, targets="all-linear"):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(make_hf_model(name).float(), config)


@pytest.mark.parametrize("name", ["llama3_gqa", "qwen2"])
def test_peft_model_packed_equals_unpacked(name):
    ref = _peft_model(name)
    model = copy.deepcopy(ref)
    handle = apply_packtune(model)
    assert handle.active and handle.model is model.get_base_model()
    samples = _samples(ref.config.vocab_size)
    batch = PackedCollator()(samples)
    model.eval(), ref.eval()
    with torch.no_grad():
        packed_logits = model(**batch).logits[0]
        alone = torch.cat([ref(input_ids=torch.tensor(s["input_ids"])[None]).logits[0] for s in samples])
    torch.testing.assert_close(packed_logits, alone, rtol=1e-5, atol=1e-5)

    model.train(), ref.train()
    num_items = torch.tensor(batch["num_label_tokens"])
    out = model(**batch, num_items_in_batch=num_items)
    expected = _per_sample_reference(ref, samples, num_items)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-7)
    out.loss.backward()
    expected.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    for (n, p), q in zip(trained, [q for q in ref.parameters() if q.requires_grad], strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_undo_through_the_peft_wrapper_is_exact():
    original = _peft_model("mistral_window").eval()
    model = copy.deepcopy(original)
    ids = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 9))}
    apply_packtune(model)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_packtune(model)
    remove_packtune(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not hasattr(model.get_base_model(), "_packtune_handle")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, original(**ids).logits)


def test_adapter_on_lm_head_refuses_the_fused_loss():
    model = _peft_model("llama3_gqa", targets=["q_proj", "lm_head"])
    with pytest.raises(UnsupportedModelError, match="lm_head"):
        apply_packtune(model)
    apply_packtune(model, fused_loss=False)
