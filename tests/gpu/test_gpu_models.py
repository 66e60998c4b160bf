"""Model-level GPU paths the kernel tests do not reach: KV-cache decoding on SDPA's fused kernels and
generation against the full forward; LoRA and QLoRA training steps with dropout (no host sync,
activation checkpointing replaying the dropout seeds, FSDP2's bf16 parameters, QLoRA under FSDP2);
dropout masks in captured CUDA graphs; the NF4 path chosen once. Skipped without CUDA."""

import copy
from types import SimpleNamespace

import pytest
import torch
from test_gpu_training import packed_row
from torch.nn.attention import SDPBackend, sdpa_kernel

from packtune.kernels import PackedLayout
from packtune.kernels.attention import alibi_head_slopes
from packtune.model.kv_cache import KVCache
from packtune.model.llama import dense_causal_attention

pytestmark = pytest.mark.gpu
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.parametrize(("hq", "hk", "window", "alibi"), [(8, 2, None, False), (8, 2, 16, False),
                                                            (4, 4, None, True)])
def test_kv_cache_decode_runs_on_fused_sdpa_kernels(hq, hk, window, alibi):
    """A decode step (GQA, Mistral's window, BLOOM's ALiBi) with SDPA's math backend ruled out: it
    runs, and equals the same rows of each whole sequence's attention."""
    d, lengths = 64, (37, 5, 20)
    seqs = [[torch.randn(n + 1, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hk, hk)]
            for n in lengths]
    slopes = alibi_head_slopes(hq, "cuda") if alibi else None
    full = [dense_causal_attention(q[None], k[None], v[None], window=window, alibi_slopes=slopes)[0]
            for q, k, v in seqs]
    cache = KVCache(SimpleNamespace(num_hidden_layers=1, num_key_value_heads=hk, head_dim=d), len(lengths),
                    max(lengths) + 1, device=torch.device("cuda"), dtype=torch.bfloat16)
    prompts = [torch.cat([s[i][:n] for s, n in zip(seqs, lengths, strict=True)]) for i in range(3)]
    layout = PackedLayout.packed(lengths).to("cuda")
    cache.begin(torch.zeros(sum(lengths), dtype=torch.long, device="cuda"), layout)
    cache.attend(0, *prompts, window=window, scale=None, softcap=None, alibi_slopes=slopes)
    cache.advance()
    cache.begin(torch.zeros(len(lengths), dtype=torch.long, device="cuda"), None)
    queries = [torch.stack([s[i][n] for s, n in zip(seqs, lengths, strict=True)]) for i in range(3)]
    with sdpa_kernel(FUSED):
        step = cache.attend(0, *queries, window=window, scale=None, softcap=None, alibi_slopes=slopes)
    expected = torch.stack([out[n] for out, n in zip(full, lengths, strict=True)])
    torch.testing.assert_close(step.float(), expected.float(), rtol=2e-2, atol=2e-2)


def _llama(vocab=1024, **overrides):
    from packtune.model.config import ModelArgs
    from packtune.model.llama import LlamaForCausalLM

    args = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(ModelArgs(**{**args, **overrides}))
    model.init_weights()
    return model


def test_generation_with_a_kv_cache_equals_the_full_forward():
    """A packed prefill of two prompts, then one decode step on the fused kernels: the new tokens'
    hidden states equal those of the full sequences run without a cache (bf16, GQA)."""
    model = _llama().to(torch.bfloat16)
    prompts = [torch.randint(0, 1024, (n,), device="cuda") for n in (9, 5)]
    nxt = torch.randint(0, 1024, (2,), device="cuda")
    cache = KVCache(model.args, 2, 10, device=torch.device("cuda"), dtype=torch.bfloat16)
    with torch.no_grad():
        model.hidden_states(torch.cat(prompts), PackedLayout.packed([9, 5]).to("cuda"), cache=cache)
        with sdpa_kernel(FUSED):
            step = model.hidden_states(nxt, cache=cache)
        whole = [torch.cat([p, nxt[i : i + 1]]) for i, p in enumerate(prompts)]
        full = model.hidden_states(torch.cat(whole), PackedLayout.packed([10, 6]).to("cuda"))
    torch.testing.assert_close(step.float(), full[[9, 15]].float(), rtol=5e-2, atol=5e-2)


def _lora_model(base: str, dropout: float = 0.1, seed: int = 0):
    from packtune.lora.apply import LoRASpec, apply_lora, lora_modules

    if base == "nf4":
        pytest.importorskip("torchao", reason="the NF4 tensor is torchao's (the qlora extra)")
    torch.manual_seed(seed)
    model = _llama()
    storage = "nf4" if base == "nf4" else torch.bfloat16
    spec = LoRASpec(rank=8, alpha=16.0, dropout=dropout)
    apply_lora(model, spec, storage, torch.Generator().manual_seed(seed), nf4_others=torch.bfloat16)
    for module in lora_modules(model).values():  # a trained adapter: B nonzero, dropout matters
        torch.nn.init.normal_(module.lora_B, std=0.02)
    return model


def _step(module, ids, labels, layout, opt=None):
    num_items = torch.tensor(float(layout.num_label_rows), device="cuda")
    loss = module(ids, labels, layout, num_items=num_items)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_lora_training_step_has_no_host_sync(base):
    """LoRA (and QLoRA) with dropout: the step after the first (Triton compiles, NF4 autotuning and
    path choice, optimizer state) does not sync: seeds are drawn on the device."""
    from packtune.loss import CausalLMLoss
    from packtune.optim import build_optimizer

    module = CausalLMLoss(_lora_model(base))
    opt = build_optimizer(module, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    row = packed_row(1024, lengths=(1000, 24, 1000))
    _step(module, *row, opt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(module, *row, opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_activation_checkpointing_replays_the_dropout_seeds():
    """Recomputing a block in the backward redraws its seeds from the restored CUDA RNG state: the
    LoRA gradients equal those of the same step without checkpointing (and a new draw differs)."""
    from packtune.loss import CausalLMLoss
    from packtune.parallel import DistContext, parallelize

    plain = _lora_model("bf16")
    checkpointed = copy.deepcopy(plain)
    single = DistContext(0, 1, 0, torch.device("cuda"), None)
    parallelize(checkpointed, checkpointed.model.layers, single, activation_checkpointing=True,
                preserve_rng_state=True)
    row = packed_row(1024, lengths=(300, 200))
    grads = []
    for model, seed in ((plain, 5), (checkpointed, 5), (plain, 6)):
        model.zero_grad(set_to_none=True)
        torch.cuda.manual_seed(seed)
        _step(CausalLMLoss(model), *row)
        grads.append([p.grad.float() for p in model.parameters() if p.requires_grad])
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, c) for a, c in zip(grads[0], grads[2], strict=True))


@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_lora_and_qlora_train_under_fsdp2_bf16(base):
    """One rank of FSDP2 with bf16 compute over fp32 LoRA parameters (QLoRA: the NF4 bases stay whole
    beside FSDP, parallel.py): finite, falling losses on one repeated row."""
    from packtune.loss import CausalLMLoss
    from packtune.optim import build_optimizer
    from packtune.parallel import init_distributed, parallelize, shutdown

    dist_ctx = init_distributed("cuda")
    try:
        model = _lora_model(base)
        module = parallelize(CausalLMLoss(model), model.model.layers, dist_ctx)
        opt = build_optimizer(module, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
        row = packed_row(1024, lengths=(700, 300))
        losses = [_step(module, *row, opt).item() for _ in range(4)]
    finally:
        shutdown(dist_ctx)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_captured_cuda_graph_draws_new_dropout_masks_per_replay():
    """The seed is drawn inside the graph from CUDA's generator: each replay, a new mask."""
    from packtune.lora.modules import LoRALinear

    layer = LoRALinear(torch.nn.Linear(256, 256, bias=False, device="cuda"), 8, 2.0, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(64, 256, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    outputs = []
    for _ in range(2):
        graph.replay()
        outputs.append(y.clone())
    assert not torch.equal(outputs[0], outputs[1])


def test_nf4_path_is_measured_once_then_read_without_sync():
    pytest.importorskip("torchao", reason="the NF4 tensor is torchao's (the qlora extra)")
    from packtune.kernels import nf4_matmul
    from packtune.lora.qlora import to_nf4

    weight = to_nf4(torch.randn(1024, 512, device="cuda") / 512**0.5)
    x = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16)
    nf4_matmul.base_matmul(x, weight, None, "triton")
    key = ("forward", x.device, x.dtype, (1024, 512), 4096)
    print(f"NF4 path at {key}: {nf4_matmul._CHOSEN[key]}")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = nf4_matmul.base_matmul(x[:2900], weight, None, "triton")  # the same power-of-two bucket
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = x[:2900] @ weight.get_original_weight().to(torch.bfloat16).t()
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)
