"""The tiled MLP: the same values and gradients as the module untiled (float64, any tile size, packed
and padded rows, the dense MLP and LoRA's fused MLP), the random draws of LoRA dropout replayed
tile by tile in the backward, and inside the Trainer with activation checkpointing."""

import io

import pytest
import torch
from toy_training import ListSampler, tiny_llama, tiny_moe, toy_steps

from packtune.config import TrainConfig
from packtune.lora.apply import LoRASpec, apply_lora
from packtune.model.config import ModelArgs
from packtune.model.llama import MLP
from packtune.parallel import init_distributed
from packtune.tiled_mlp import (
    auto_tile_tokens,
    resolve_tile_tokens,
    tile_bounds,
    tile_mlp,
    tile_mlps,
    tiled_forward,
)
from packtune.train import Trainer


def mlp(dtype=torch.float64, seed=0) -> MLP:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=11, hidden_size=8, intermediate_size=24, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    module = MLP(args).to(dtype)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


def values_and_grads(module, x):
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def assert_same(a, b, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("tile", [1, 3, 7, 19])
@pytest.mark.parametrize("shape", [(20, 8), (3, 7, 8)])
def test_tiled_equals_untiled(tile, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    reference = values_and_grads(mlp(), x)
    tiled = mlp()
    tile_mlp(tiled, tile)
    assert_same(values_and_grads(tiled, x), reference)
    names = [n for n, _ in tiled.named_parameters()]
    assert names == [n for n, _ in mlp().named_parameters()]  # names and state dict unchanged


def test_tile_bounds_cover_the_row():
    assert tile_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert tile_bounds(4, 4) == [(0, 4)]


def test_short_rows_and_no_grad_run_the_plain_forward():
    module = mlp()
    x = torch.randn(5, 8, dtype=torch.float64)
    assert type(tiled_forward(module, 2, x).grad_fn).__name__ == "_TiledForwardBackward"
    assert type(tiled_forward(module, 5, x).grad_fn).__name__ != "_TiledForwardBackward"  # one tile
    with torch.no_grad():
        assert tiled_forward(module, 2, x).grad_fn is None


def test_frozen_input_and_frozen_weights():
    """A first block's input needs no gradient (frozen embeddings); frozen weights get none."""
    module, reference = mlp(), mlp()
    module.gate_proj.weight.requires_grad_(False)
    reference.gate_proj.weight.requires_grad_(False)
    tile_mlp(module, 3)
    x = torch.randn(10, 8, dtype=torch.float64)
    module(x).sum().backward()
    reference(x).sum().backward()
    assert module.gate_proj.weight.grad is None
    for (name, p), q in zip(module.named_parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


def lora_model(dropout: float, seed: int = 0):
    model = tiny_llama(seed=seed)
    apply_lora(model, LoRASpec(rank=4, alpha=8.0, dropout=dropout), torch.float32,
               generator=torch.Generator().manual_seed(1))
    for layer in model.decoder_layers:  # B is zero at init: give the adapters a value
        for p in layer.mlp.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(2))
    return model


def test_lora_mlp_tiled_equals_untiled():
    from packtune.lora.modules import LoRAMLP

    reference, tiled = lora_model(0.0).decoder_layers[0].mlp, lora_model(0.0).decoder_layers[0].mlp
    assert isinstance(tiled, LoRAMLP)
    tile_mlp(tiled, 4)
    x = torch.randn(18, 32)
    assert_same(values_and_grads(tiled, x), values_and_grads(reference, x), rtol=1e-5, atol=1e-6)


def test_lora_dropout_draws_replayed_in_the_backward():
    """With dropout the tiles draw their own seeds: the backward recomputes each tile with the draws
    of its forward, so values and gradients are those of the same tiles run with a graph, and
    torch's generator ends where it would without the replay."""
    module = lora_model(0.3).decoder_layers[0].mlp
    trainable = [p for p in module.parameters() if p.requires_grad]
    x = torch.randn(18, 32)
    torch.manual_seed(7)
    expected = torch.cat([module(x[a:b]) for a, b in tile_bounds(18, 5)])
    weight = torch.linspace(-1, 1, expected.numel()).view_as(expected)
    expected_grads = torch.autograd.grad((expected * weight).sum(), trainable)
    tile_mlp(module, 5)
    torch.manual_seed(7)
    out = module(x)
    after = torch.get_rng_state()
    grads = torch.autograd.grad((out * weight).sum(), trainable)
    assert torch.equal(torch.get_rng_state(), after)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)
    assert not torch.equal(module(x), out)  # the dropout is on


def test_auto_tile_rule():
    assert auto_tile_tokens(1536) == 4096  # SmolLM2-135M
    assert auto_tile_tokens(8192) == 1024  # Llama-3.2-1B
    assert auto_tile_tokens(14336) == 512  # Llama-3.1-8B
    assert auto_tile_tokens(10**9) == 256
    model = tiny_llama()
    assert resolve_tile_tokens("auto", model) == auto_tile_tokens(64)
    assert resolve_tile_tokens(False, model) is None and resolve_tile_tokens(16, model) == 16


def train(model, output_dir, **train_overrides):
    """(loss and grad norm of 3 Trainer steps, the parameter gradients of one more micro-batch)."""
    import json

    cfg = TrainConfig(output_dir=str(output_dir), max_steps=3, lr=1e-2, warmup=1, max_grad_norm=0.5,
                      **train_overrides)
    steps = toy_steps(4, micro_batches=2, per_micro=4, seed=3)
    torch.manual_seed(0)
    trainer = Trainer(cfg, model, ListSampler(steps[:3]), init_distributed("cpu"), log_stream=io.StringIO())
    trainer.fit()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    batch = steps[3][0]
    trainer._loss(batch, torch.tensor(float(batch.num_items)), weighted=True).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [[r["loss"], r["grad_norm"]] for r in records], grads


MODELS = {"dense": lambda: tiny_llama(seed=4), "lora": lambda: lora_model(0.0),
          "moe": lambda: tiny_moe(seed=4)}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_trainer_tiled_with_checkpointing_equals_untiled(tmp_path, kind, monkeypatch):
    import packtune.tiled_mlp

    make = MODELS[kind]
    base, base_grads = train(make(), tmp_path / "plain", activation_checkpointing=True)
    tiled_rows = []
    monkeypatch.setattr(packtune.tiled_mlp, "tile_bounds",
                        lambda n, t: tiled_rows.append(n) or tile_bounds(n, t))
    tiled, tiled_grads = train(make(), tmp_path / "tiled", activation_checkpointing=True, tiled_mlp=3)
    layers = len(make().decoder_layers)  # an MoE block tiles its experts, a dense block its MLP
    assert len(tiled_rows) == layers * 2 * (2 * 3 + 1)  # forward + recompute, 7 micro-batches
    torch.testing.assert_close(torch.tensor(tiled), torch.tensor(base), rtol=1e-6, atol=0)
    assert tiled_grads.keys() == base_grads.keys() and base_grads
    for name, value in base_grads.items():
        # fp32 rounding: the tiles sum each weight's gradient in another order than one matmul does (on
        # one thread an element near zero moves by ~1e-5 of the tensor's largest)
        scale = value.abs().max().item()
        torch.testing.assert_close(tiled_grads[name], value, rtol=1e-5, atol=1e-4 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def moe_block(lora: bool):
    """The first sparse block of a float64 toy Qwen3-MoE (with LoRA on its experts: adapters of value)."""
    model = tiny_moe(seed=2).to(torch.float64)
    if lora:
        apply_lora(model, LoRASpec(2, 4.0, targets=("experts.gate_up_proj", "experts.down_proj")))
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.decoder_layers[0].mlp


@pytest.mark.parametrize("lora", [False, True])
def test_mixture_of_experts_block_tiled_equals_untiled(lora):
    """The router over the whole row, its experts tile by tile: the block's output, its router load
    (the load-balancing and z losses' inputs) and every gradient equal the untiled block's."""
    def run(module):
        x = torch.randn(2, 11, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        x.requires_grad_(True)
        real = torch.arange(22) % 7 != 6  # some padding
        out, load = module(x, real)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        ((out * weight).sum() + 0.3 * (load.probs * load.counts).sum() + 0.1 * load.z).backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        return out.detach(), x.grad, grads

    tiled = moe_block(lora)
    tile_mlp(tiled.experts, 4)
    result = run(tiled)
    tolerance = 1e-6 if lora else 1e-12  # the adapters are fp32 (PEFT's), the base float64
    assert_same(result, run(moe_block(lora)), rtol=tolerance, atol=tolerance)
    assert any("lora_" in name for name in result[2]) == lora


def test_tile_mlps_tiles_the_experts_and_the_dense_mlps_of_a_mixture_of_experts():
    model = tiny_moe()
    assert tile_mlps(model.decoder_layers, 4) == 3
    sparse, dense = model.decoder_layers[0].mlp, model.decoder_layers[1].mlp
    assert "forward" in vars(sparse.experts) and "forward" not in vars(sparse) and "forward" in vars(dense)
    assert resolve_tile_tokens("auto", model) == auto_tile_tokens(64)  # max(64, 2 experts x 16)
    assert resolve_tile_tokens("auto", tiny_moe(intermediate_size=16)) == auto_tile_tokens(32)


def _saved_float_bytes(model, tokens: int, sample: int) -> int:
    """Bytes of the distinct float storages `model`'s first block saves for its backward on a packed row
    of `tokens` tokens (samples of `sample`), leaving out the block's input and the parameters."""
    from packtune.kernels import PackedLayout
    from packtune.model.llama import AttentionInputs

    layout = PackedLayout.packed([sample] * (tokens // sample))
    cos, sin = model.rope(layout.max_seqlen, torch.device("cpu"))
    inputs = AttentionInputs(layout.positions, cos, sin, layout.cu_seqlens, layout.max_seqlen)
    x = torch.randn(tokens, model.args.hidden_size, requires_grad=True)
    skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t.is_floating_point() and ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.decoder_layers[0](x, inputs)
    return sum(saved.values())


def test_a_tiled_block_saves_no_intermediate_and_one_attention_output():
    """What a recomputed block keeps per token for its backward (docs/long-context.md, its table): the
    normed input, the bucketed q/k/v, SDPA's output and lse, the attention output, the residual and
    the MLP's input; nothing `[tokens x intermediate]` (tiled) and no second copy of the attention
    output (the bucketed attention's scatter back kept one until it became a gather)."""
    model = tiny_llama(hidden_size=32, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8).float()
    tile_mlps(model.decoder_layers, 16)
    h, q, kv, heads = 32, 32, 16, 4
    per_token = (_saved_float_bytes(model, 128, 32) - _saved_float_bytes(model, 64, 32)) / 64
    bound = 4 * (h + (q + 2 * kv) + q + q + h + h) + 4 * heads + 4 * 2
    assert per_token <= bound, (per_token, bound)
