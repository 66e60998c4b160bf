"""Preference objectives on the real stories260K Llama (../shared/real) with a chat template written
here: the step-1 loss of `packtune train`'s stages and the gradients of its first update equal a
float64 reference computed with transformers' own model (and, for DPO, TRL's DPOTrainer's loss and
gradients on the same pairs); prompts packed once give the unshared losses and gradients to 1e-6.

The reference tokenizes as TRL does (`apply_chat_template` of the prompt with the generation prompt,
then of the prompt with each response; the completion is what follows the prompt) and computes each
objective from the papers' formulas, one sequence at a time, in float64."""

import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import write_jsonl
from real_files import real_path

from packtune.config import load_config
from packtune.data.rows import prepare_run_data
from packtune.parallel import init_distributed
from packtune.preference.reference import attach_reference
from packtune.run import build_trainer

transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                 "{{ bos_token }}User: {{ m['content'] }}\n"
                 "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
NAMES, THINGS = ["Lily", "Tom", "Sue", "Ben"], ["ball", "dog", "cat", "kite"]
PLACES = ["park", "house", "yard"]
PAIRS = 8


def story_pairs(n: int, seed: int = 0) -> list[dict]:
    """Conversational pairs: a story that follows the request (chosen) and a muddled one (rejected)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name, thing, place = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
        good = f"Once upon a time, {name} had a {thing}. {name} played with the {thing} in the {place}."
        bad = f"The {place} was {rng.choice(['big', 'sad'])}. {rng.choice(NAMES)} did not like it."
        turn = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
        request = f"Tell me a story about {name} and a {thing}."
        records.append({"prompt": [{"role": "user", "content": request}],
                        "chosen": turn(good), "rejected": turn(bad)})
    return records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The real checkpoint with a chat template (the policy), a perturbed copy (the DPO reference), pairs."""
    real = real_path("stories260K")
    root = tmp_path_factory.mktemp("preference_real")
    policy = root / "policy"
    policy.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer.model"):
        (policy / name).symlink_to(real / name)
    config = json.loads((real / "tokenizer_config.json").read_text())
    (policy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    ref = root / "ref"
    model = transformers.AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=generator))
    model.save_pretrained(ref)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(policy / name, ref / name)
    records = story_pairs(PAIRS)
    data = write_jsonl(root / "pairs.jsonl", records)
    return {"policy": policy, "ref": ref, "records": records, "data": data}


def packtune_step(world, tmp_path, objective: str, **preference) -> tuple[float, dict[str, torch.Tensor]]:
    """The step-1 loss written to metrics.jsonl and the gradients the first update applies, from
    `packtune train`'s stages (every pair in step 1: 4 micro-batches of packed pairs)."""
    overrides = [f'model.path="{world["policy"]}"', f'data.path="{world["data"]}"', 'data.template="auto"',
                 "data.max_tokens=320", "data.num_workers=1", f'data.cache_dir="{tmp_path / "cache"}"',
                 f'train.output_dir="{tmp_path / "run"}"', "train.max_steps=1", "train.micro_batches=4",
                 'train.device="cpu"', f'train.objective="{objective}"', "train.max_grad_norm=0",
                 "train.export=false", "train.progress=\"none\"",
                 *[f"preference.{k}={json.dumps(v)}" for k, v in preference.items()]]
    cfg = load_config(None, overrides)
    cfg.check()
    dist_ctx = init_distributed("cpu")
    data = prepare_run_data(cfg, dist_ctx)
    assert len(data.sampler) == 1  # one step holds every pair
    trainer = build_trainer(cfg, data, dist_ctx, mixed=False)
    attach_reference(cfg, data.dataset, trainer, dist_ctx, mixed=False)
    grads = {}

    def capture(optimizer, args, kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(capture)
    trainer.fit()
    trainer.metrics.close()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    return record["loss"], grads


def sequence_logps(model, tokenizer, prompt, response):
    """(summed log-prob of the completion, its token count) as TRL tokenizes and scores it."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    ids = tokenizer.apply_chat_template(prompt + response, tokenize=True)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    logp = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logp[len(prompt_ids) - 1 :].sum(), len(ids) - len(prompt_ids)


def reference_step(world, objective: str, beta=0.1, simpo_gamma=0.5, orpo_lambda=0.1, ref=True):
    """The step's loss and its gradients (by name) with transformers' Llama in float64."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(world["policy"])
    load = transformers.AutoModelForCausalLM.from_pretrained
    policy = load(world["policy"], dtype=torch.float64)
    reference = load(world["ref"], dtype=torch.float64) if ref else None
    total, nll, chosen_tokens = 0.0, 0.0, 0
    for r in world["records"]:
        sides = ("chosen", "rejected")
        (lc, nc), (lr, nr) = (sequence_logps(policy, tokenizer, r["prompt"], r[s]) for s in sides)
        if objective == "dpo":
            with torch.no_grad():
                rc, rr = (sequence_logps(reference, tokenizer, r["prompt"], r[s])[0] for s in sides)
            total = total - F.logsigmoid(beta * ((lc - rc) - (lr - rr)))
        elif objective == "simpo":
            total = total - F.logsigmoid(beta * lc / nc - beta * lr / nr - simpo_gamma)
        else:  # orpo
            odds = lambda a: a - torch.log(-torch.expm1(a))  # noqa: E731
            total = total - orpo_lambda * F.logsigmoid(odds(lc / nc) - odds(lr / nr))
            nll, chosen_tokens = nll - lc, chosen_tokens + nc
    loss = total / len(world["records"]) + (nll / chosen_tokens if objective == "orpo" else 0.0)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in policy.named_parameters()}


def assert_gradients_match(grads, expected, rtol):
    assert grads.keys() <= expected.keys() and len(grads) == len(expected)
    for name, grad in grads.items():
        error = (grad.double() - expected[name]).norm() / expected[name].norm()
        assert error <= rtol, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize(("objective", "preference"), [
    ("dpo", {"beta": 0.1}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}),
    ("orpo", {"orpo_lambda": 0.1}),
])
def test_step_one_loss_and_gradients_equal_transformers(world, tmp_path, objective, preference):
    ref_model = {"ref_model": str(world["ref"])} if objective == "dpo" else {}
    loss, grads = packtune_step(world, tmp_path, objective, **preference, **ref_model)
    expected, expected_grads = reference_step(world, objective, **preference)
    assert math.isclose(loss, expected, rel_tol=1e-5), (loss, expected)
    assert_gradients_match(grads, expected_grads, rtol=1e-5)


def test_dpo_step_equals_trl_dpo_trainer(world, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    loss, grads = packtune_step(world, tmp_path, "dpo", beta=0.1, ref_model=str(world["ref"]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(world["policy"])
    policy = transformers.AutoModelForCausalLM.from_pretrained(world["policy"], dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(world["ref"], dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=PAIRS, beta=0.1,
                         max_length=None, use_cpu=True, report_to=[], bf16=False, disable_dropout=True,
                         dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(world["records"]))
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    assert math.isclose(loss, trl_loss.item(), rel_tol=1e-5), (loss, trl_loss.item())
    trl_grads = {n: p.grad.double() for n, p in trainer.model.named_parameters()}
    assert_gradients_match(grads, trl_grads, rtol=1e-5)


def test_shared_prompts_give_the_unshared_loss_and_gradients(world, tmp_path):
    shared = packtune_step(world, tmp_path / "shared", "dpo", beta=0.1, ref_model=str(world["ref"]),
                           shared_prompt=True)
    apart = packtune_step(world, tmp_path / "apart", "dpo", beta=0.1, ref_model=str(world["ref"]),
                          shared_prompt=False)
    assert math.isclose(shared[0], apart[0], rel_tol=1e-6)
    assert_gradients_match(shared[1], {n: g.double() for n, g in apart[1].items()}, rtol=1e-6)
