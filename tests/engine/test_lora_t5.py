"""LoRA on T5 (the family's targets, on the blocks of both stacks: self-attention, cross-attention and
feed-forward), PEFT-compatible both ways: packtune's adapter loads in PEFT with packtune's logits, and
PEFT's adapter loads in packtune with PEFT's logits."""

import pytest
import torch
from t5_fixtures import save_hf_t5

from packtune.lora import LoRASpec, apply_lora, load_adapter_into, save_adapter
from packtune.lora.apply import block_linears
from packtune.lora.peft_format import adapter_tensors
from packtune.model.families import family_for
from packtune.model.hf_io import load_pretrained
from packtune.model.t5_batch import pack_pairs

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PAIRS = [([5, 9, 23, 1], [40, 41, 1]), ([7, 1], [12, 13, 14, 15, 1]), (list(range(2, 30)), [3, 1])]


def _logits_both(model, hf_model):
    batch = pack_pairs(PAIRS, 0)
    with torch.no_grad():
        ours = model.eval()(batch.input_ids, batch.decoder_input_ids, batch.layout)
        theirs = torch.cat([hf_model(input_ids=torch.tensor([s]), labels=torch.tensor([t])).logits[0]
                            for s, t in PAIRS])
    return ours, theirs


def _assert_close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["t5_v11", "t5_original"])
def test_block_linears_are_the_family_targets(tmp_path, name):
    model = load_pretrained(save_hf_t5(name, tmp_path / "base"))
    gated = model.args.gated
    assert block_linears(model) == tuple(t for t in family_for("t5").lora_targets
                                         if t not in (("wi",) if gated else ("wi_0", "wi_1")))


@pytest.mark.parametrize("targets", [None, ("q", "v", "wo")])
def test_packtune_adapter_loads_in_peft(tmp_path, targets):
    base = save_hf_t5("t5_v11", tmp_path / "base")
    model = load_pretrained(base, dtype=torch.float32)
    spec = LoRASpec(4, 8.0) if targets is None else LoRASpec(2, 3.0, targets=targets, rslora=True)
    modules = apply_lora(model, spec)
    assert any(".EncDecAttention." in n for n in modules) and any("encoder." in n for n in modules)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    save_adapter(tmp_path / "adapter", spec, adapter_tensors(model), str(base))
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(base, dtype=torch.float32)
    _assert_close(*_logits_both(model, peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()))


def test_peft_adapter_loads_in_packtune(tmp_path):
    base = save_hf_t5("t5_original", tmp_path / "base")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules="all-linear", init_lora_weights=False,
                             task_type="SEQ_2_SEQ_LM")
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_pretrained(base, dtype=torch.float32)
    spec = load_adapter_into(model, tmp_path / "adapter")
    assert sorted(spec.targets) == sorted(block_linears(model))
    ours, theirs = _logits_both(model, peft_model)
    _assert_close(ours, theirs)
