"""Adding adapters: step 0 is the base model, only adapters train, [lora] config errors, QLoRA's
NF4 base memory, and a dropout forward that activation checkpointing replays exactly."""

import pytest
import torch
from toy_training import tiny_llama

from packtune.config import Config, load_config
from packtune.errors import ConfigError
from packtune.lora import LoRALinear, LoRAMLP, LoRASpec, apply_lora, parameter_counts
from packtune.lora.apply import base_bytes


def _ids():
    return torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))


def test_adapters_start_at_the_base_model_and_alone_train():
    model = tiny_llama()
    with torch.no_grad():
        before = model(_ids())
    total_before = parameter_counts(model)[1]
    apply_lora(model, LoRASpec(4, 8.0), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), before, rtol=0, atol=0)
    trainable, total = parameter_counts(model)
    # per layer: q 4*(32+32), k 4*(32+16), v the same, o 4*(32+32), gate/up 4*(32+64), down 4*(64+32)
    assert trainable == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96) and total == total_before + trainable
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert all(isinstance(layer.mlp, LoRAMLP) for layer in model.model.layers)
    a = model.model.layers[0].self_attn.q_proj.lora_A
    assert a.abs().max() <= 1 / 32**0.5 and a.std() > 0  # Kaiming-uniform(a=sqrt(5)) bound 1/sqrt(in)


def test_partial_targets_keep_the_plain_mlp():
    model = tiny_llama()
    apply_lora(model, LoRASpec(2, 2.0, targets=("q_proj", "up_proj")))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, LoRALinear)
    assert not isinstance(layer.self_attn.k_proj, LoRALinear)
    assert isinstance(layer.mlp.up_proj, LoRALinear) and not isinstance(layer.mlp, LoRAMLP)


@pytest.mark.parametrize("hidden_act", ["silu", "gelu_pytorch_tanh"])
def test_fused_lora_mlp_equals_the_models_own_mlp(hidden_act):
    """The fused LoRAMLP computes the family's MLP (GeGLU for Gemma's gelu_pytorch_tanh) over the
    same LoRALinears: logits equal the model with its own MLP modules put back."""
    from packtune.model.config import ModelArgs
    from packtune.model.llama import LlamaForCausalLM

    args = ModelArgs(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=64, hidden_act=hidden_act)
    model = LlamaForCausalLM(args)
    model.init_weights(torch.Generator().manual_seed(0))
    own_mlps = [layer.mlp for layer in model.model.layers]
    apply_lora(model, LoRASpec(4, 8.0), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        fused = model(_ids())
        for layer, mlp in zip(model.model.layers, own_mlps, strict=True):
            assert isinstance(layer.mlp, LoRAMLP) and isinstance(mlp.gate_proj, LoRALinear)
            layer.mlp = mlp
        torch.testing.assert_close(fused, model(_ids()), rtol=1e-5, atol=1e-5)


def test_nf4_base_is_under_a_third_of_bf16():
    pytest.importorskip("torchao")
    bf16, nf4 = tiny_llama(), tiny_llama()
    apply_lora(bf16, LoRASpec(4, 8.0), torch.bfloat16)
    apply_lora(nf4, LoRASpec(4, 8.0), "nf4")
    linears = lambda m: sum(base_bytes(mod) for mod in m.modules() if isinstance(mod, LoRALinear))
    assert linears(nf4) <= 0.3 * linears(bf16)
    with torch.no_grad():
        assert (nf4(_ids()) - bf16(_ids()).float()).abs().max() < 1.0  # a 4-bit copy of the same model


def test_dropout_replays_under_activation_checkpointing():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    grads = []
    for wrap in (False, True):
        model = tiny_llama()
        apply_lora(model, LoRASpec(4, 8.0, dropout=0.5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(1))
        if wrap:
            layers = model.model.layers
            for i, layer in enumerate(layers):
                layers[i] = checkpoint_wrapper(layer, preserve_rng_state=True)
        torch.manual_seed(5)
        model(_ids()).square().mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("text", "message"), [
    ("[lora]\nrnak = 4\n", "did you mean 'rank'"),
    ("[lora]\nrank = 4\ntargets = [\"q_prj\"]\n", "did you mean 'q_proj'"),
    ("[lora]\nrank = 4\ntargets = \"all\"\n", "all-linear"),
    ("[lora]\nrank = -1\n", "lora.rank must be >= 0"),
    ("[lora]\nrank = 4\ndropout = 1.0\n", "lora.dropout"),
    ("[lora]\nrank = 4\nbase_dtype = \"nf5\"\n", "did you mean 'nf4'"),
    ("[lora]\nrank = 4\n[train]\nexport = \"merge\"\n", "train.export must be"),
    ("[train]\nexport = \"adapter\"\n", "needs a LoRA run"),
])
def test_lora_config_errors(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(path)
        cfg.lora.check()
        cfg.check_export()


def test_lora_defaults_are_full_fine_tuning():
    cfg = Config()
    assert cfg.lora.rank == 0 and cfg.train.export is True and not cfg.lora.enabled
    cfg.lora.check()
    cfg.check_export()


def test_nf4_base_that_fsdp_cannot_split_evenly_is_refused_by_name():
    pytest.importorskip("torchao")
    from packtune.lora.sharded_nf4 import check_nf4_shardable

    toy = tiny_llama()  # q_proj [32, 32]: 16 blocks of 64, one group of quantised scales
    apply_lora(toy, LoRASpec(4, 8.0), "nf4")
    with pytest.raises(ConfigError, match=r"over 2 ranks: model.layers.0.self_attn.q_proj.weight \(32, 32\) "
                                          r"has 32 rows and 1 groups"):
        check_nf4_shardable(toy, 2)
    wide = tiny_llama(hidden_size=256, intermediate_size=512, head_dim=64)
    apply_lora(wide, LoRASpec(4, 8.0), "nf4")
    check_nf4_shardable(wide, 2)
    with pytest.raises(ConfigError, match="over 3 ranks"):
        check_nf4_shardable(wide, 3)
