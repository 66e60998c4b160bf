"""`lora.init_from` in `packtune train`: a run continues from an adapter directory, and an adapter
whose targets differ from [lora]'s (checked against the model's own linears) is refused by name."""

import torch
from test_lora_train import argv, assets  # noqa: F401  (assets is a fixture)

from packtune.cli import main
from packtune.lora import read_adapter


def test_init_from_continues_the_adapter_and_refuses_other_targets(tmp_path, assets, capsys):  # noqa: F811
    first = tmp_path / "first"
    some = 'lora.targets=["q_proj", "v_proj"]'
    assert main(argv(assets, "llama", first, some, "train.max_steps=2", "train.lr=1e-2")) == 0
    _, trained = read_adapter(first / "final")
    assert any(t.abs().sum() > 0 for name, t in trained.items() if name.endswith("lora_B"))

    refused = tmp_path / "refused"
    init_from = f'lora.init_from="{first / "final"}"'
    assert main(argv(assets, "llama", refused, init_from, "train.max_steps=1")) == 2
    err = capsys.readouterr().err
    assert "adapts q_proj, v_proj but [lora] targets q_proj, k_proj, v_proj, o_proj" in err
    assert "set lora.targets = ['q_proj', 'v_proj']" in err and "Traceback" not in err

    second = tmp_path / "second"
    assert main(argv(assets, "llama", second, some, init_from, "train.max_steps=1", "train.lr=1e-12",
                     "train.warmup=0")) == 0
    assert f"adapters from {first / 'final'}" in capsys.readouterr().out
    _, continued = read_adapter(second / "final")
    assert continued.keys() == trained.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(continued[name], tensor, rtol=1e-6, atol=1e-8)
