"""PEFT compatibility both ways: packtune's adapter loads in PEFT with packtune's logits, PEFT's
adapter loads in packtune (lora.init_from's path) with PEFT's logits, and merging matches both."""

import json

import pytest
import torch
from model_fixtures import family_fixtures, model_type, save_hf_model

from packtune.lora import LoRASpec, apply_lora, load_adapter_into, merge_adapter, save_adapter
from packtune.lora.apply import block_linears
from packtune.lora.peft_format import adapter_tensors
from packtune.model.families import family_for
from packtune.model.hf_io import load_pretrained

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FAMILIES = [*family_fixtures().values(), "llama_tied"]  # every registered family, and a tied Llama


def _randomise_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _ids():
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


def _assert_logits_close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _spec(kind: str, model) -> LoRASpec:
    if kind == "all":
        return LoRASpec(4, 8.0)
    targets = block_linears(model)[::3]  # a partial list in the family's own names
    return LoRASpec(2, 3.0, targets=targets, rslora=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["all", "some-rslora"])
def test_packtune_adapter_loads_in_peft(tmp_path, family, kind):
    base_dir = save_hf_model(family, tmp_path / "base")
    model = load_pretrained(base_dir, dtype=torch.float32)
    spec = _spec(kind, model)
    apply_lora(model, spec)
    _randomise_adapters(model)
    save_adapter(tmp_path / "adapter", spec, adapter_tensors(model), str(base_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == spec.rank and config["peft_type"] == "LORA"

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        _assert_logits_close(model.eval()(ids), peft_model(input_ids=ids).logits)


def _peft_targets(family: str) -> dict:
    """PEFT's "all-linear"; for a mixture of experts the attention and the experts' weights by name
    (PEFT's `target_parameters`): on transformers 5's MoE models PEFT's all-linear also adapts the
    router and gives gate_up_proj twice the rank, which packtune does not (see test_lora_moe.py)."""
    experts = [t for t in family_for(model_type(family)).lora_targets if t.startswith("experts.")]
    if not experts:
        return {"target_modules": "all-linear"}
    return {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "target_parameters": [f"mlp.{t}" for t in experts]}


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_packtune_and_merges(tmp_path, family):
    base_dir = save_hf_model(family, tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, task_type="CAUSAL_LM",
                             **_peft_targets(family))
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits

    model = load_pretrained(base_dir, dtype=torch.float32)
    spec = load_adapter_into(model, tmp_path / "adapter")
    assert spec.rank == 4 and spec.alpha == 6 and sorted(spec.targets) == sorted(block_linears(model))
    with torch.no_grad():
        _assert_logits_close(model.eval()(ids), expected)

    merged_dir = merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        _assert_logits_close(merged(input_ids=ids).logits, expected)
