"""apply_packtune on transformers' Llama/Mistral/Qwen2/Qwen3/Gemma 2/Gemma 3/Phi-3: packed ==
unpacked, exact undo, refusal by name."""

from __future__ import annotations

import copy

import pytest
import torch
from model_fixtures import CONFIGS, make_hf_model, model_type

from packtune.integrations import PackedCollator, UnsupportedModelError, apply_packtune, remove_packtune
from packtune.model.families import family_for

transformers = pytest.importorskip("transformers")

APPLIED = sorted(n for n in CONFIGS if family_for(model_type(n)).hf is not None)  # the others: refused, below
LENGTHS = (7, 3, 12, 1, 9)  # longer than every sliding window (4 to 6), and a 1-token sample


def _samples(vocab: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        prompt = int(torch.randint(0, n, (), generator=gen))
        out.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (n - prompt)})
    return out


def _per_sample_reference(model, samples, num_items):
    """Sum over samples of transformers' own loss on each sample alone, divided by num_items."""
    collate = PackedCollator()
    loss = 0
    for s in samples:
        b = collate([s])
        loss = loss + model(input_ids=b["input_ids"], labels=b["labels"], num_items_in_batch=num_items).loss
    return loss


def _assert_close_grads(a, b, rtol=1e-4, atol=1e-6):
    """fp32 rounding: `rtol` per element, and `atol` or 1e-5 of the tensor's largest gradient,
    whichever is larger (the packed row and the separate samples sum their terms in different
    orders, so a near-zero element of a tensor can differ by a few of the large ones' ulps)."""
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        tol = max(atol, 1e-5 * float(pb.grad.abs().max()))
        torch.testing.assert_close(pa.grad, pb.grad, rtol=rtol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", APPLIED)
def test_packed_equals_unpacked(name):
    """A packed row through the patched model == each sample alone through the original model:
    logits (eval), and the fused training loss and every gradient with a global token count."""
    ref = make_hf_model(name).float()
    model = copy.deepcopy(ref)
    apply_packtune(model)
    samples = _samples(ref.config.vocab_size)
    batch = PackedCollator()(samples)
    with torch.no_grad():
        packed_logits = model(**batch).logits[0]
        alone = torch.cat([ref(input_ids=torch.tensor(s["input_ids"])[None]).logits[0] for s in samples])
    torch.testing.assert_close(packed_logits, alone, rtol=1e-5, atol=1e-5)

    model.train(), ref.train()
    num_items = torch.tensor(batch["num_label_tokens"] + 5)  # as if other micro-batches held 5 more
    out = model(**batch, num_items_in_batch=num_items)
    assert out.logits is None, "the fused loss must not materialise logits in training"
    expected = _per_sample_reference(ref, samples, num_items)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-7)
    out.loss.backward()
    expected.backward()
    _assert_close_grads(model, ref)


@pytest.mark.parametrize("name", ["gemma3", "phi3", "phi3_longrope"])
def test_packed_rows_with_transformers_rotary(name):
    """rotary=False: packed rows rotate with transformers' per-token cos/sin (Gemma 3's per layer
    type, Phi-3's partial and longrope per sample) and still equal each sample alone."""
    ref = make_hf_model(name).float()
    model = copy.deepcopy(ref)
    apply_packtune(model, rotary=False)
    samples = _samples(ref.config.vocab_size)
    with torch.no_grad():
        packed_logits = model(**PackedCollator()(samples)).logits[0]
        alone = torch.cat([ref(input_ids=torch.tensor(s["input_ids"])[None]).logits[0] for s in samples])
    torch.testing.assert_close(packed_logits, alone, rtol=1e-5, atol=1e-5)


def test_packing_found_from_position_ids_alone():
    """Without cu_seqlens (e.g. transformers' DataCollatorWithFlattening), restarting position_ids
    delimit the samples; unshifted labels alone are shifted per sample, never across samples."""
    model = make_hf_model("llama3_gqa").float().train()
    apply_packtune(model)
    batch = PackedCollator()(_samples(model.config.vocab_size))
    full = model(**batch).loss
    bare = model(
        input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]
    ).loss
    torch.testing.assert_close(bare, full, rtol=1e-6, atol=0)
    # labels that would let a sample predict the next one's first token are cut at the boundary
    leaky = batch["input_ids"].clone()
    cut = model(
        input_ids=batch["input_ids"],
        labels=leaky,
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        max_seqlen=batch["max_seqlen"],
    ).loss
    starts = batch["cu_seqlens"][1:-1].long()
    manual = leaky.clone()
    manual[0, starts] = -100
    expected = model(input_ids=batch["input_ids"], labels=manual, position_ids=batch["position_ids"]).loss
    torch.testing.assert_close(cut, expected, rtol=1e-6, atol=0)


def test_padded_batches_and_eval_loss_unchanged():
    """An ordinary padded batch (attention_mask, no packing) gives transformers' loss and grads;
    in eval the logits are returned and the loss is packtune's masked CE on them."""
    ref = make_hf_model("qwen2").float()
    model = copy.deepcopy(ref)
    apply_packtune(model)
    ids = torch.randint(0, ref.config.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    for train in (True, False):
        model.train(train), ref.train(train)
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
        want = ref(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-7)
        if train:
            got.loss.backward(), want.loss.backward()
            _assert_close_grads(model, ref)
        else:
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", ["mistral_window", "gemma3", "phi3"])
def test_undo_restores_the_original_forward_bitwise(name):
    original = make_hf_model(name)
    model = copy.deepcopy(original)
    samples = _samples(model.config.vocab_size)
    packed = PackedCollator()(samples)
    hf_packed = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"], "use_cache": False}
    padded = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 9))}
    handle = apply_packtune(model)
    kinds = ("RMSNorm", "MLP", "Attention")
    patchable = sum(type(m).__name__.endswith(kinds) for m in model.modules())
    assert handle.active and handle.patched_modules == patchable + 1  # norms (q/k too), mlps, attns, lm
    if name == "mistral_window":
        assert handle.patched_modules == 2 * 2 + 1 + 2 + 2 + 1
    with pytest.raises(RuntimeError, match="already applied"):
        apply_packtune(model)
    _outputs(model, packed)
    handle.undo()
    assert not handle.active and not hasattr(model, "_packtune_handle")
    assert all("forward" not in m.__dict__ for m in model.modules())
    for batch in (hf_packed, padded):
        assert torch.equal(_outputs(model, batch), _outputs(original, batch))
    remove_packtune(model)  # no-op once undone
    apply_packtune(model, fused_loss=False, rms_norm=False, swiglu=False, rotary=False, packed=False,
                   geglu=False)
    assert all("forward" not in m.__dict__ for m in model.modules()), "all switches off patches nothing"


def test_switches_patch_only_what_they_name():
    model = make_hf_model("llama3_gqa")
    apply_packtune(model, fused_loss=False, rotary=False, packed=False, swiglu=False)
    patched = {type(m).__name__ for m in model.modules() if "forward" in m.__dict__}
    assert patched == {"LlamaRMSNorm"}
    remove_packtune(model)
    apply_packtune(model, rms_norm=False, swiglu=False, rotary=False, packed=False)
    patched = {type(m).__name__ for m in model.modules() if "forward" in m.__dict__}
    assert patched == {"LlamaForCausalLM"}
    gemma = make_hf_model("gemma2")
    apply_packtune(gemma, fused_loss=False, rms_norm=False, rotary=False, packed=False)
    patched = {type(m).__name__ for m in gemma.modules() if "forward" in m.__dict__}
    assert patched == {"Gemma2MLP"}, "geglu, not swiglu, names Gemma's MLP"
    remove_packtune(gemma)
    apply_packtune(gemma, fused_loss=False, swiglu=False, geglu=False, rotary=False, packed=False)
    patched = {type(m).__name__ for m in gemma.modules() if "forward" in m.__dict__}
    assert patched == {"Gemma2RMSNorm"}


def test_unsupported_architecture_is_refused_by_name():
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*'gpt2'.*LlamaForCausalLM"):
        apply_packtune(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    base = transformers.LlamaModel(make_hf_model("llama3_gqa").config)  # no LM head: nothing to fuse
    with pytest.raises(UnsupportedModelError, match="LlamaModel"):
        apply_packtune(base)


def test_gemma3_multimodal_is_refused_by_name():
    text = make_hf_model("gemma3").config
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4)
    model = transformers.Gemma3ForConditionalGeneration(config)
    message = "Gemma3ForConditionalGeneration.*'gemma3'.*Gemma3ForCausalLM"
    with pytest.raises(UnsupportedModelError, match=message):
        apply_packtune(model)


def test_gemma_refuses_what_it_cannot_reproduce():
    config = make_hf_model("gemma2").config
    config.hidden_activation = "gelu"
    model = transformers.Gemma2ForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="hidden_activation='gelu'.*geglu=False"):
        apply_packtune(model)
    apply_packtune(model, geglu=False)
    config = make_hf_model("gemma3").config
    config.use_bidirectional_attention = True
    model = transformers.Gemma3ForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        apply_packtune(model)
    apply_packtune(model, packed=False)


def test_trl_fused_lm_head_call_caps_gemma_logits():
    """TRL's `fused_lm_head=True` call on Gemma 2: per-token log-probs, entropy and top-1 from the
    final-logit-capped distribution, as transformers' capped logits give them."""
    ref = make_hf_model("gemma2").float()
    model = copy.deepcopy(ref)
    apply_packtune(model)
    samples = _samples(ref.config.vocab_size)
    batch = PackedCollator()(samples)
    out = model(**batch, fused_lm_head=True)
    with torch.no_grad():
        logits = torch.cat([ref(input_ids=torch.tensor(s["input_ids"])[None]).logits[0] for s in samples])
    targets = batch["shift_labels"][0]
    mask = targets != -100
    log_p = logits.log_softmax(-1)
    expected = log_p[mask].gather(1, targets[mask, None])[:, 0]
    torch.testing.assert_close(out.log_probs[0][mask], expected, rtol=1e-5, atol=1e-6)
    entropy = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(out.entropy[0][mask], entropy[mask], rtol=1e-5, atol=1e-6)
    assert torch.equal(out.is_top1[0][mask], logits[mask].argmax(-1) == targets[mask])


def test_bloom_is_refused_with_the_reason():
    model = make_hf_model("bloom")
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM.*'bloom'.*cannot take packed input.*"
                                                    "ALiBi.*packtune train"):
        apply_packtune(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_swiglu_refuses_other_activations():
    config = make_hf_model("llama3_gqa").config
    config.hidden_act = "gelu"
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
        apply_packtune(model)
    apply_packtune(model, swiglu=False)


def test_transformers_flattening_collator_and_activation_checkpointing():
    """transformers' DataCollatorWithFlattening (position_ids only, or with its flash-attention
    offsets) gives the same loss as PackedCollator; activation checkpointing changes nothing."""
    model = make_hf_model("llama3_gqa").float().train()
    apply_packtune(model)
    samples = [{"input_ids": ids} for ids in ([5, 9, 2, 7, 1], [3, 3, 8, 4, 6, 2, 9, 1], [4, 2, 7])]
    loss = model(**PackedCollator()(samples)).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for options in ({}, {"return_flash_attn_kwargs": True}):
        batch = transformers.DataCollatorWithFlattening(**options)(samples)
        torch.testing.assert_close(model(**batch).loss, loss, rtol=1e-6, atol=0)
    model.zero_grad()
    model.activation_checkpointing_enable()
    checkpointed = model(**PackedCollator()(samples)).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, loss, rtol=0, atol=0)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-8)


def test_bf16_autocast_error_no_worse_than_transformers():
    """Under bf16 autocast the fused loss runs its matmuls in bf16 (as lm_head would); loss and
    gradients stay as close to the fp32 result as transformers' own autocast run (+1e-2)."""
    fp32 = make_hf_model("llama3_gqa").float().train()
    fp32.config.use_cache = False
    hf_amp, patched = copy.deepcopy(fp32), copy.deepcopy(fp32)
    apply_packtune(patched)
    batch = PackedCollator()(_samples(fp32.config.vocab_size))
    exact = fp32(**batch).loss
    exact.backward()
    results = []
    for model in (hf_amp, patched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grad_err = max(
            float((p.grad - q.grad).norm() / q.grad.norm())
            for p, q in zip(model.parameters(), fp32.parameters(), strict=True)
        )
        results.append((abs(float(loss.detach() - exact.detach())), grad_err))
    (hf_loss_err, hf_grad_err), (loss_err, grad_err) = results
    assert loss_err <= hf_loss_err + 1e-2
    assert grad_err <= hf_grad_err + 1e-2


@pytest.mark.parametrize("name", ["mistral_window", "qwen2", "gemma2", "gemma3", "phi3", "phi3_longrope"])
def test_generation_with_cache_and_left_padding_unchanged(name):
    ref = make_hf_model(name).float()
    model = copy.deepcopy(ref)
    apply_packtune(model)
    ids = torch.randint(0, ref.config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**options), ref.generate(**options))
