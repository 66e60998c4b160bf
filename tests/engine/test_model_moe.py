"""The mixture-of-experts families beyond the shared family tests (test_model.py and the others run
them too): the load-balancing loss against transformers' on unpadded input, a packed row equal to
transformers' padded batch with its padding masked; the older one-Linear-per-expert checkpoints and
gpt-oss's MXFP4 experts loaded (and exported dense); YaRN's frequencies as transformers computes them."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import make_hf_model, save_hf_model
from safetensors.torch import load_file, save_file

from packtune.kernels import PackedLayout
from packtune.model.config import ModelArgs
from packtune.model.hf_io import WEIGHTS_NAME, load_pretrained, save_pretrained
from packtune.model.moe import router_losses

transformers = pytest.importorskip("transformers")

MOE = ["qwen3_moe", "qwen3_moe_dense", "mixtral", "olmoe", "gpt_oss"]
LENGTHS = (7, 13, 20)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: save_hf_model(name, root / name) for name in MOE}


def _samples(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS]


def _aux(model, ids, layout=None):
    with torch.no_grad():
        model(ids, layout)
    return router_losses(model.router_loads)[0]


@pytest.mark.parametrize("name", MOE)
def test_aux_loss_equals_transformers_and_skips_padding(checkpoints, name):
    """Each sample alone equals transformers' aux_loss on it; a packed row of all three, and packtune's
    padded batch of them, equal transformers' on its padded batch with the attention mask (transformers
    counts in fp32: 1e-6)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float64,
                                                           experts_implementation="eager").eval()
    ours = load_pretrained(checkpoints[name], dtype=torch.float64)
    samples = _samples(ours.args.vocab_size)
    with torch.no_grad():
        for s in samples:
            theirs = hf(input_ids=s[None], output_router_logits=True).aux_loss
            torch.testing.assert_close(_aux(ours, s), theirs.double(), rtol=1e-6, atol=0)
        width = max(LENGTHS)
        padded = torch.zeros(len(samples), width, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for i, s in enumerate(samples):
            padded[i, : len(s)], mask[i, : len(s)] = s, 1
        theirs = hf(input_ids=padded, attention_mask=mask, output_router_logits=True).aux_loss.double()
    packed = _aux(ours, torch.cat(samples), PackedLayout.packed(LENGTHS))
    torch.testing.assert_close(packed, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(_aux(ours, padded, PackedLayout.padded(LENGTHS)), packed, rtol=1e-12, atol=0)
    unmasked = _aux(ours, padded, PackedLayout.padded([width] * len(samples)))  # padding counted: differs
    assert not torch.allclose(unmasked, packed, rtol=1e-6)


def _per_expert(tensors, mixtral):
    """transformers 5's fused experts split back into one Linear per expert (Mixtral: w1 / w3 / w2
    under `block_sparse_moe.`, its router there too)."""
    out = {}
    for key, t in tensors.items():
        prefix = key.rsplit(".", 1)[0]
        if mixtral:
            prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        if key.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{names[0]}.weight"] = gate[e].contiguous()
                out[f"{prefix}.{e}.{names[1]}.weight"] = up[e].contiguous()
        elif key.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{names[2]}.weight"] = t[e].contiguous()
        else:
            out[key.replace(".mlp.gate.", ".block_sparse_moe.gate.") if mixtral else key] = t
    return out


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_per_expert_checkpoint_layout_is_stacked_on_load(checkpoints, tmp_path, name):
    """The layout before transformers 5 (and of Mixtral's released checkpoints) loads into the same
    fused weights as transformers' own conversion; the export writes transformers 5's names."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((checkpoints[name] / "config.json").read_text())
    tensors = _per_expert(load_file(checkpoints[name] / "model.safetensors"), name == "mixtral")
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in tensors)
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    fused = load_pretrained(checkpoints[name]).state_dict()
    stacked = load_pretrained(legacy).state_dict()
    assert list(stacked) == list(fused)
    for key, value in fused.items():
        assert torch.equal(stacked[key], value), key
    theirs = transformers.AutoModelForCausalLM.from_pretrained(legacy, dtype=torch.float32).state_dict()
    for key, value in fused.items():
        assert torch.equal(theirs[key], value), key


FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _mxfp4(shape, gen):
    """Random MXFP4 codes for a stored [E, out, in] matrix: (blocks, scales, the values they hold as
    gpt-oss's [E, in, out] weight), the values worked out here from the E2M1 table."""
    experts, out, inner = shape
    codes = torch.randint(0, 16, (experts, out, inner), generator=gen)
    scales = torch.randint(124, 130, (experts, out, inner // 32), generator=gen, dtype=torch.uint8)
    magnitude = torch.tensor(FP4)[codes % 8]
    values = torch.where(codes >= 8, -magnitude, magnitude)
    values = values * 2.0 ** (scales.long() - 127).repeat_interleave(32, dim=-1)
    pairs = codes.view(experts, out, inner // 32, 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)  # the low nibble holds the first
    return blocks, scales, values.transpose(1, 2)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_gpt_oss_mxfp4_checkpoint_loads_and_exports_dense(tmp_path):
    """A gpt-oss checkpoint whose experts are MXFP4 blocks and scales (as released): packtune's weights
    are the quantised values exactly, its logits transformers' (asked to dequantise), and the
    export is a dense checkpoint without quantization_config that transformers loads to equal logits."""
    hf = make_hf_model("gpt_oss")
    src = tmp_path / "mxfp4"
    hf.save_pretrained(src)
    tensors, gen, expected = load_file(src / "model.safetensors"), torch.Generator().manual_seed(0), {}
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stored = tensors.pop(key).transpose(1, 2).shape  # [E, out, in]
        tensors[f"{key}_blocks"], tensors[f"{key}_scales"], expected[key] = _mxfp4(stored, gen)
    save_file({k: v.contiguous() for k, v in tensors.items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (src / "config.json").write_text(json.dumps(config))

    ours = load_pretrained(src, dtype=torch.float32)
    state = ours.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    ids = torch.randint(0, 96, (2, 9), generator=gen)
    with torch.no_grad():
        logits = ours(ids)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    with torch.no_grad():
        close(theirs(ids).logits, logits)
    save_pretrained(ours, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "quantization_config" not in exported and exported["model_type"] == "gpt_oss"
    assert not any(k.endswith(("_blocks", "_scales")) for k in load_file(tmp_path / "export" / WEIGHTS_NAME))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    with torch.no_grad():
        close(reloaded.eval()(ids).logits, logits)


def test_a_missing_expert_is_named(checkpoints, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((checkpoints["mixtral"] / "config.json").read_text())
    tensors = _per_expert(load_file(checkpoints["mixtral"] / "model.safetensors"), mixtral=True)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    from packtune.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"layers.1.mlp.experts.down_proj: checkpoint \[3, 64, 32\]"):
        load_pretrained(legacy)


@pytest.mark.parametrize("rope", [
    {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0, "truncate": False},
    {"factor": 32.0, "original_max_position_embeddings": 4096},  # truncate defaults to true
    {"factor": 8.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"factor": 2.0, "original_max_position_embeddings": 128, "attention_factor": 1.5, "beta_slow": 2.0},
])
def test_yarn_frequencies_and_attention_factor_equal_transformers(rope):
    """YaRN is read for every family that reads RoPE generally (a Llama config here)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from packtune.model.rope import inv_freq

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1,
                                      vocab_size=32, max_position_embeddings=8192,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, **rope})
    theirs, attention = ROPE_INIT_FUNCTIONS["yarn"](config, None)
    args = ModelArgs.from_hf_config(config.to_dict())
    assert torch.equal(inv_freq(args), theirs)
    assert args.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-15)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss"])
def test_apply_packtune_refuses_the_moe_families_with_the_reason(name):
    from packtune.integrations import apply_packtune
    from packtune.integrations.transformers import UnsupportedModelError

    model = make_hf_model(name)
    with pytest.raises(UnsupportedModelError, match="load-balancing loss .*packtune train"):
        apply_packtune(model)


def test_a_released_gpt_oss_config_parses():
    """gpt-oss-20b's config.json layout (transformers 4 keys: rope_scaling + rope_theta, MXFP4
    quantization_config, router_aux_loss_coef 0.9): the args, and a config transformers reads back."""
    layers = 24
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
           "attention_dropout": 0.0, "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64,
           "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
           "initializer_range": 0.02, "intermediate_size": 2880, "max_position_embeddings": 131072,
           "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": layers,
           "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
           "pad_token_id": 199999, "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
               "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
           "rms_norm_eps": 1e-05, "rope_theta": 150000,
           "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "rope_type": "yarn",
                            "original_max_position_embeddings": 4096, "truncate": False},
           "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
           "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088}
    args = ModelArgs.from_hf_config(cfg)
    assert (args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size) == (32, 4, 2880)
    assert args.window(0) == 128 and args.window(1) is None and args.attention_sinks and args.router_bias
    assert args.rope_scaling.rope_type == "yarn" and not args.rope_scaling.truncate
    assert args.rope_theta == 150000
    assert args.router_aux_loss_coef == 0.9
    written = args.to_hf_config()
    assert "quantization_config" not in written
    assert transformers.GptOssConfig.from_dict(written).rope_parameters["rope_type"] == "yarn"
    assert ModelArgs.from_hf_config(written) == args


@pytest.mark.parametrize("name", ["qwen3_moe_dense", "gpt_oss"])
def test_the_loss_adds_the_weighted_router_terms(checkpoints, name):
    """CausalLMLoss adds router_weight x (aux_coef x aux + z_coef x z); the z-loss is the mean over the
    sparse layers' tokens of logsumexp(router logits) ** 2, worked out here from the routers' inputs."""
    from packtune.kernels.packed_layout import shift_labels
    from packtune.loss import CausalLMLoss
    from packtune.model.moe import Router

    model = load_pretrained(checkpoints[name], dtype=torch.float64)
    inputs = []
    for module in model.modules():
        if isinstance(module, Router):
            module.register_forward_hook(lambda m, args, out: inputs.append(
                torch.nn.functional.linear(args[0], m.weight, m.bias)))
    ids = torch.cat(_samples(model.args.vocab_size))
    layout = PackedLayout.packed(LENGTHS)
    labels = shift_labels(ids, layout.cu_seqlens[1:].long() - 1)
    plain = CausalLMLoss(model)(ids, labels, layout)
    inputs.clear()
    loss = CausalLMLoss(model, aux_coef=0.5, z_coef=0.1)(ids, labels, layout, router_weight=0.25)
    aux, z = router_losses(model.router_loads)
    expected_z = torch.cat([logits.logsumexp(-1) ** 2 for logits in inputs]).mean()
    torch.testing.assert_close(z, expected_z, rtol=1e-12, atol=0)
    expected = plain.double() + 0.25 * (0.5 * aux + 0.1 * z)  # the fused loss is fp32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
