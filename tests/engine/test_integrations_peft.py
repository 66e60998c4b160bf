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


@pytest.fixture
def fused_calls(monkeypatch):
    """Records (kernel, dropout) for each call of packtune's fused LoRA kernels from PEFT layers."""
    import packtune.integrations.peft_lora as peft_lora

    calls = []
    for name in ("lora_linear", "lora_mlp"):
        original = getattr(peft_lora, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, args[6 if _name == "lora_linear" else 5]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(peft_lora, name, counting)
    return calls


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "up_proj"]])
def test_peft_lora_layers_run_the_fused_kernels(fused_calls, targets, dtype, rtol):
    """Every PEFT LoRA layer goes through packtune's fused LoRA linear (an all-LoRA MLP through the
    fused LoRA MLP), and the loss and every adapter gradient equal those of the same patched model
    running PEFT's own LoRA layers (`lora=False`; packed == unpacked is the test above)."""
    model = _peft_model("llama3_gqa", targets).to(dtype)
    ref = copy.deepcopy(model)
    apply_packtune(model)
    apply_packtune(ref, lora=False)
    batch = PackedCollator()(_samples(model.config.vocab_size))
    num_items = torch.tensor(batch["num_label_tokens"])
    losses = [m.train()(**batch, num_items_in_batch=num_items).loss for m in (model, ref)]
    torch.testing.assert_close(losses[0], losses[1], rtol=rtol, atol=0)
    layers = model.config.num_hidden_layers
    per_layer = [("lora_linear", 0.0)] * 4 + [("lora_mlp", 0.0)] if targets == "all-linear" else \
        [("lora_linear", 0.0)] * 3
    assert fused_calls == per_layer * layers
    for loss in losses:
        loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * len(per_layer) * layers if targets != "all-linear" else 14 * layers
    for (n, p), q in zip(trained, [q for q in ref.parameters() if q.requires_grad], strict=True):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_peft_dropout_runs_in_the_kernel_and_other_cases_run_peft(fused_calls):
    """Dropout is the kernel's (training only); a disabled or merged adapter runs PEFT's forward."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["q_proj", "o_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    ref = peft.get_peft_model(make_hf_model("qwen2").float(), config)
    model = copy.deepcopy(ref)
    apply_packtune(model, fused_loss=False, packed=False)
    ids = {"input_ids": torch.randint(0, ref.config.vocab_size, (1, 11))}
    layers = ref.config.num_hidden_layers
    model.train()
    torch.manual_seed(3)
    first = model(**ids).logits
    torch.manual_seed(3)
    assert torch.equal(model(**ids).logits, first), "the masks come from torch's seeded generator"
    assert fused_calls == [("lora_linear", 0.25)] * 4 * layers
    fused_calls.clear()
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, ref(**ids).logits, rtol=1e-5, atol=1e-5)
        assert fused_calls == [("lora_linear", 0.0)] * 2 * layers
        fused_calls.clear()
        with model.disable_adapter(), ref.disable_adapter():
            torch.testing.assert_close(model(**ids).logits, ref(**ids).logits, rtol=1e-5, atol=1e-5)
        model.merge_adapter(), ref.merge_adapter()
        torch.testing.assert_close(model(**ids).logits, ref(**ids).logits, rtol=1e-5, atol=1e-5)
    assert fused_calls == []
