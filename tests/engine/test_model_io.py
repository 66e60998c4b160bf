"""Checkpoint I/O: config parsing, sharded round trips through transformers, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import CONFIGS, save_hf_model
from safetensors.torch import load_file, save_file

from packtune.errors import CheckpointError, ModelError
from packtune.model.config import ModelArgs
from packtune.model.hf_io import INDEX_NAME, WEIGHTS_NAME, load_pretrained, save_pretrained
from packtune.model.llama import LlamaForCausalLM

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model("llama3_gqa", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, llama_dir):
    path = tmp_path_factory.mktemp("sharded") / "model"
    save_pretrained(load_pretrained(llama_dir), path, max_shard_bytes=40_000)
    return path


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("name", [n for n in CONFIGS if "longrope" not in n])  # factors sized for 64 wide
def test_config_round_trips_through_export(tmp_path, name):
    cls_name, kwargs = CONFIGS[name]
    getattr(transformers, cls_name)(
        **{"vocab_size": 32, "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, **kwargs}
    ).save_pretrained(tmp_path)
    args = ModelArgs.from_file(tmp_path)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def test_transformers_4_config_layout():
    """Older config.json files: rope_theta + rope_scaling with "type", no num_key_value_heads (Llama 1/2)."""
    base = dict(model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64)
    base.update(num_hidden_layers=1, num_attention_heads=4, rope_theta=5e5)
    args = ModelArgs.from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert (args.rope_theta, args.rope_scaling.rope_type, args.rope_scaling.factor) == (5e5, "linear", 4.0)
    assert args.num_key_value_heads == 4 and args.head_dim == 8 and args.sliding_window is None
    qwen = ModelArgs.from_hf_config({**base, "model_type": "qwen2", "num_key_value_heads": 2})
    assert qwen.qkv_bias and not qwen.o_bias and qwen.window(0) is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"model_type": None}, "model_type None is not supported"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}},
         "rope scaling type 'longrope' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported for llama"),
        ({"quantization_config": {"quant_method": "gptq"}}, "'quantization_config' is not supported"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"hidden_size": "64"}, "hidden_size must be a positive integer"),
    ],
)
def test_unsupported_config_is_a_clear_error(tmp_path, llama_dir, change, message):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.update(change)
    copy_dir(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=message) as err:
        load_pretrained(tmp_path / "m")
    assert "config.json" in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
                              "short_factor": [1.0] * 5, "long_factor": [2.0] * 6}},
         "longrope short_factor has 5 entries, expected 6"),
        ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 6}}, "longrope long_factor must be a list"),
        ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6},
          "original_max_position_embeddings": None}, "longrope needs original_max_position_embeddings"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
         "rope scaling type 'dynamic' is not supported for phi3"),
        ({"resid_pdrop": 0.1}, "resid_pdrop=0.1 is not supported"),
        ({"embd_pdrop": 0.1}, "embd_pdrop=0.1 is not supported"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types on a phi3 config"),
        ({"partial_rotary_factor": 1.5, "rope_parameters": None}, "partial_rotary_factor=1.5 must be in"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for phi3"),
    ],
)
def test_phi3_options_refused_by_name(tmp_path, change, message):
    save_hf_model("phi3", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(change)
    with pytest.raises(ModelError, match=message):
        ModelArgs.from_hf_config(cfg)


def test_phi3_longrope_legacy_layout(tmp_path):
    """Phi-3-128k's config.json (transformers 4 layout: a `rope_scaling` block, the original context at
    the top level): longrope, inverse frequencies and attention factor equal to transformers' own
    for both factor sets; "su" (its older name) reads the same; the export round-trips."""
    import math

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from packtune.model.rope import inv_freq

    save_hf_model("phi3", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=1e4, partial_rotary_factor=0.75, max_position_embeddings=128,
               original_max_position_embeddings=32,
               rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2, 3, 4, 5],
                             "long_factor": [2.0] * 6})
    args = ModelArgs.from_hf_config(cfg)
    su = ModelArgs.from_hf_config({**cfg, "rope_scaling": {**cfg["rope_scaling"], "type": "su"}})
    assert su.rope_scaling == args.rope_scaling
    scaling = args.rope_scaling
    assert scaling.rope_type == "longrope" and scaling.original_max_position_embeddings == 32
    assert scaling.attention_factor == math.sqrt(1 + math.log(4) / math.log(32))
    hf_config = transformers.Phi3Config.from_dict(cfg)
    for seq_len in (None, 32, 33):
        theirs, attention = ROPE_INIT_FUNCTIONS["longrope"](hf_config, None, seq_len=seq_len)
        assert torch.equal(inv_freq(args, seq_len), theirs) and attention == scaling.attention_factor
    assert not torch.equal(inv_freq(args, 32), inv_freq(args, 33))
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def test_phi3_layout_and_partial_rotary(tmp_path):
    args = ModelArgs.from_file(save_hf_model("phi3", tmp_path / "m"))
    assert args.fused_projections and args.partial_rotary_factor == 0.75 and args.rotary_dim == 12
    assert args.window(0) == args.window(1) == 5 and not args.qkv_bias and not args.mlp_bias
    names = set(LlamaForCausalLM(args).state_dict())
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names
    assert not any("q_proj" in n or ".gate_proj" in n for n in names)


def test_invalid_json_names_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n  "vocab_size": }')
    with pytest.raises(ModelError, match=r"config.json:2:\d+: invalid JSON"):
        ModelArgs.from_file(tmp_path)


def test_sharded_export_loads_in_both(llama_dir, sharded_dir):
    index = json.loads((sharded_dir / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (sharded_dir / WEIGHTS_NAME).exists()
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(sharded_dir).eval()
    ours = load_pretrained(sharded_dir)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=0)
    for name, p in original.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name), p, rtol=0, atol=0)


def test_dtype_and_tied_weights(tmp_path):
    path = save_hf_model("qwen2", tmp_path / "qwen")
    model = load_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_pretrained(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "lm_head.weight" not in load_file(tmp_path / "bf16" / WEIGHTS_NAME)
    again = load_pretrained(tmp_path / "bf16")  # dtype None: the stored dtype
    assert (
        again.lm_head.weight.dtype == torch.bfloat16
        and again.lm_head.weight is again.model.embed_tokens.weight
    )


def test_from_scratch_model_exports_for_transformers(tmp_path):
    """The demo path: ModelArgs built in code, init_weights, export; transformers gives the same logits."""
    args = ModelArgs(
        vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(args)
    model.init_weights(torch.Generator().manual_seed(0))
    save_pretrained(model, tmp_path / "scratch")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "scratch").eval()
    ids = torch.randint(0, 80, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-6)
    matmul = sum(p.numel() for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    assert args.num_flops_per_token(10) == 6 * (matmul + 80 * 48) + 12 * 2 * 6 * 8 * 10


def test_save_copies_tokenizer_files_and_replaces_atomically(tmp_path, llama_dir):
    src = copy_dir(llama_dir, tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    (tmp_path / "extra.model").write_bytes(b"spm")
    model = load_pretrained(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "stale.txt").write_text("from an earlier export")
    save_pretrained(model, out, tokenizer_files=[tmp_path / "extra.model"])
    files = {f.name for f in out.iterdir()}
    assert files == {"config.json", WEIGHTS_NAME, "tokenizer.json", "generation_config.json", "extra.model"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.model", "out", "src"]  # no temp dirs left

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a model directory"):
        save_pretrained(model, tmp_path / "notes")


def test_failed_save_leaves_nothing(tmp_path, llama_dir, monkeypatch):
    import packtune.model.hf_io as hf_io

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(load_pretrained(llama_dir), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors(tmp_path, llama_dir):
    path = copy_dir(llama_dir, tmp_path / "m")
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: not a readable safetensors file .*truncated"
    ):
        load_pretrained(path)


def test_missing_shard(tmp_path, sharded_dir):
    path = copy_dir(sharded_dir, tmp_path / "m")
    shard = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"missing: {shard} \(\d+ tensors\)"):
        load_pretrained(path)


def test_wrong_shape_missing_and_unexpected_tensors_listed_together(tmp_path, llama_dir):
    path = copy_dir(llama_dir, tmp_path / "m")
    tensors = load_file(path / WEIGHTS_NAME)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    del tensors["model.norm.weight"]
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(3)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old checkpoints: ignored
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert "1 missing: model.norm.weight" in msg
    assert "1 unexpected: model.layers.2.mlp.up_proj.weight" in msg
    assert "1 wrong shape: model.layers.1.mlp.up_proj.weight: checkpoint [95, 64], model [96, 64]" in msg


def test_pickle_only_directory_is_refused(tmp_path, llama_dir):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        load_pretrained(path)
