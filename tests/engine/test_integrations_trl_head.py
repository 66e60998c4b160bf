"""apply_packtune answers TRL's `fused_lm_head=True` call with what TRL's own head would return, under
the settings TRL gave that head: GRPO's and RLOO's sampling temperature, `cast_lm_head_to_fp32`,
and Gemma 2's final-logit cap, which the temperature divides after the cap."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from model_fixtures import make_hf_model

from packtune.integrations import apply_packtune
from packtune.integrations.lm_head import HeadTransform
from packtune.integrations.transformers import UnsupportedModelError, trl_head

transformers = pytest.importorskip("transformers")
trl_utils = pytest.importorskip("trl.trainer.utils")

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _call(model, ids, mask, labels, weights):
    """One training forward as GRPO makes it (left-padded prompts, an attention mask), then a
    backward of per-token weights on the log-probs, as a policy-gradient loss does."""
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    (out.log_probs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", ["llama3_gqa", "gemma2"])
@pytest.mark.parametrize(("temperature", "fp32"), [(0.7, False), (1.3, True)])
def test_packtune_answers_what_trls_head_would(name, temperature, fp32):
    base = make_hf_model(name).float()
    base.config.use_cache = False
    vocab = base.config.vocab_size
    theirs, ours, plain = (copy.deepcopy(base) for _ in range(3))
    for model, t in ((theirs, temperature), (ours, temperature), (plain, 1.0)):
        trl_utils.add_fused_lm_head(model, temperature=t, cast_lm_head_to_fp32=fp32, outputs=FIELDS)
    assert trl_head(ours) == HeadTransform(temperature, 1.0, fp32)
    apply_packtune(ours)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (2, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :6] = -100  # the prompt: no log-prob wanted
    weights = torch.randn(2, 13, generator=gen)
    want, want_grads = _call(theirs, ids, mask, labels, weights)
    got, got_grads = _call(ours, ids, mask, labels, weights)
    untempered, _ = _call(plain, ids, mask, labels, weights)

    assert torch.equal(got.label_mask, want.label_mask) and torch.equal(got.is_top1, want.is_top1)
    for field in ("loss", *FIELDS[:4]):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, f=field: f"{f}: {m}")
    assert not torch.allclose(untempered.log_probs, want.log_probs, atol=1e-3), "the temperature matters"
    assert got_grads.keys() == want_grads.keys() and got_grads
    for n, g in got_grads.items():  # fp32: to 1e-4 of the largest entry (docs/kernels.md, Tolerances)
        atol = 1e-4 * want_grads[n].abs().max().item()
        torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_an_unreadable_trl_head_is_refused():
    """A forward named like TRL's whose settings are not where TRL 1.x keeps them: refused by name."""
    model = make_hf_model("llama3_gqa").float()

    def _fused_forward(self, *args, **kwargs):
        return None

    elsewhere = types.FunctionType(_fused_forward.__code__, {"__name__": "trl.trainer.utils"})
    model.forward = types.MethodType(elsewhere, model)
    with pytest.raises(UnsupportedModelError, match="cannot read temperature"):
        apply_packtune(model)
    assert trl_head(make_hf_model("llama3_gqa")) == HeadTransform()
