"""LoRA on mixtures of experts beyond the shared tests (test_lora_peft.py moves every family's adapters
both ways through PEFT, expert weights included): QLoRA with NF4 experts, and what is refused by name
(dropout on expert weights, which PEFT's target_parameters refuse too; PEFT's all-linear on transformers
5's MoE models, which also adapts the router)."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import save_hf_model

from packtune.errors import ConfigError
from packtune.kernels.nf4_matmul import dense_weight, is_nf4
from packtune.lora import LoRASpec, apply_lora, merged_state_dict, read_adapter
from packtune.lora.experts import LoRAExperts
from packtune.model.hf_io import load_pretrained

EXPERTS = ("q_proj", "experts.gate_up_proj", "experts.down_proj")


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_qlora_experts_are_nf4_and_equal_lora_over_their_dequantised_weights(tmp_path, family):
    """NF4 expert weights (2-D [E * d1, d2] for torchao) give the logits and adapter gradients of LoRA
    over the same weights dequantised; the merged state dict has transformers' 3-D shapes."""
    pytest.importorskip("torchao")
    path = save_hf_model(family, tmp_path / "base")
    spec = LoRASpec(4, 8.0, targets=EXPERTS)
    qlora = load_pretrained(path, dtype=torch.float32)
    apply_lora(qlora, spec, storage="nf4", nf4_others=torch.float32)
    _randomise(qlora)
    experts = [m for m in qlora.modules() if isinstance(m, LoRAExperts)]
    assert experts and all(is_nf4(m.gate_up_proj) and m.gate_up_proj.dim() == 2 for m in experts)

    reference = load_pretrained(path, dtype=torch.float32)
    apply_lora(reference, spec)
    with torch.no_grad():
        for p, q in zip(reference.state_dict(keep_vars=True).values(), qlora.state_dict().values(),
                        strict=True):
            p.copy_(dense_weight(q, torch.float32).view(p.shape))  # NF4 -> its bf16 values, in fp32
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    losses = [m(ids).float().logsumexp(-1).sum() for m in (qlora, reference)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for loss in losses:
        loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (qlora, reference)]
    assert grads[0].keys() == grads[1].keys() and any("adapters.gate_up_proj" in n for n in grads[0])
    for name, grad in grads[0].items():
        expected = grads[1][name]
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    merged = merged_state_dict(qlora, qlora.state_dict())
    for name, value in load_pretrained(path).state_dict().items():
        assert merged[name].shape == value.shape, name


def test_dropout_on_expert_weights_is_refused(tmp_path):
    model = load_pretrained(save_hf_model("mixtral", tmp_path / "base"))
    with pytest.raises(ConfigError, match="adapters on expert weights take no dropout"):
        apply_lora(model, LoRASpec(4, 8.0, dropout=0.1))
    apply_lora(model, LoRASpec(4, 8.0, dropout=0.1, targets=("q_proj", "v_proj")))  # attention alone: fine


def test_peft_all_linear_on_a_transformers_5_moe_is_refused_by_name(tmp_path):
    """PEFT's all-linear on Qwen3-MoE also adapts the router (`gate.weight`) and doubles gate_up_proj's
    rank, as the per-expert gate_proj and up_proj of transformers 4 would have had; packtune does not."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(save_hf_model("qwen3_moe", tmp_path / "base"))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ConfigError, match="target_parameters names 'gate.weight'; packtune adapts"):
        read_adapter(tmp_path / "adapter")
