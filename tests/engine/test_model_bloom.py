"""BLOOM specifics beyond tests/engine/test_model.py's per-family checks (which include the
bloom and bloom_6heads checkpoints): the hub's checkpoint layout, config parsing and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import save_hf_model
from safetensors.torch import load_file, save_file

from packtune.errors import ModelError
from packtune.model.config import ModelArgs
from packtune.model.hf_io import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")


def test_hub_layout_without_transformer_prefix_loads(tmp_path):
    """bigscience's bloom / bloomz files hold BloomModel's names (`h.0...`, no `transformer.`): they
    load as the same model (test_model.py holds the full layout to transformers' logits)."""
    full = save_hf_model("bloom", tmp_path / "full")
    tensors = load_file(full / "model.safetensors")
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, hub / "model.safetensors",
              metadata={"format": "pt"})
    (hub / "config.json").write_text((full / "config.json").read_text())
    assert not any(k.startswith("transformer.") for k in load_file(hub / "model.safetensors"))
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(hub)(ids), load_pretrained(full)(ids), rtol=0, atol=0)
        load = transformers.AutoModelForCausalLM.from_pretrained
        theirs = [load(p).eval()(ids).logits for p in (hub, full)]
    torch.testing.assert_close(theirs[0], theirs[1], rtol=0, atol=0)  # transformers reads both alike


def test_config_parsing_and_export_keys(tmp_path):
    path = save_hf_model("bloom_6heads", tmp_path / "m")
    args = ModelArgs.from_file(path)
    assert (args.num_attention_heads, args.head_dim, args.intermediate_size) == (6, 8, 192)
    assert args.alibi and args.residual_post_layernorm and not args.tie_word_embeddings
    save_pretrained(load_pretrained(path), tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_head"], cfg["hidden_size"], cfg["architectures"]) == (2, 6, 48,
                                                                                         ["BloomForCausalLM"])
    assert "num_attention_heads" not in cfg and "rope_theta" not in cfg
    assert ModelArgs.from_file(tmp_path / "out") == args


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_dropout": 0.1}, "hidden_dropout=0.1 is not supported"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
        ({"slow_but_exact": True, "pretraining_tp": 4}, "slow_but_exact with pretraining_tp=4"),
        ({"n_head": 5}, "hidden_size=64 is not a multiple of n_head=5"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
    ],
)
def test_unsupported_bloom_config_is_a_clear_error(tmp_path, change, message):
    path = save_hf_model("bloom", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=message):
        load_pretrained(path)


def test_flops_count_the_parameters(tmp_path):
    model = load_pretrained(save_hf_model("bloom_6heads", tmp_path / "m"))
    args = model.args
    assert not args.tie_word_embeddings  # so lm_head is a parameter of its own: counted, the embedding not
    params = sum(p.numel() for n, p in model.named_parameters() if n != "transformer.word_embeddings.weight")
    attention = 12 * args.num_hidden_layers * args.hidden_size * 10
    assert args.num_flops_per_token(10) == 6 * params + attention
