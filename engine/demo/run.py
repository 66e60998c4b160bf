"""`packtune demo`: the whole engine on a fresh machine, with nothing to download.

1. Generate the instruction mix (train, held-out instances, held-out phrasings) as Alpaca JSONL.
2. Train a sentencepiece tokenizer on the rendered training records.
3. Write a randomly initialised tiny Llama (or T5: `--model t5`) as a Hugging Face directory.
4. Score it on the held-out split (greedy generation, exact match): the "before" number.
5. Train it with `packtune train`'s own code path (data pipeline, packing, fused masked loss,
   the training loop), which exports the result as a Hugging Face directory.
6. Score the trained model, show sample generations, write the loss curve and `demo.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from packtune.atomic_write import write_atomic
from packtune.datatools.scoring import EvalReport
from packtune.demo.evaluate import score
from packtune.demo.mix import make_split, write_jsonl
from packtune.demo.recipe import RECIPES, DemoRecipe, write_template
from packtune.demo.tasks import TASKS
from packtune.errors import TrainingError


def evaluate(
    model, prompts, records: list[dict[str, str]], max_new_tokens: int
) -> tuple[EvalReport, list[str]]:
    """Greedy answers of `model` to `records`, scored by `packtune eval`'s generation and evaluator."""
    from packtune.data.formats import Message
    from packtune.datatools.local_generation import generate_answers

    conversations = [[Message("user", record["instruction"], record.get("input", ""))] for record in records]
    predictions = generate_answers(model, prompts, conversations, max_new_tokens)
    return score(records, predictions), predictions


def headline(report: EvalReport, recipe: DemoRecipe) -> float:
    """Exact match over the held-out records of the tasks in the headline (all but `outside_headline`)."""
    left_out = dict(recipe.outside_headline)
    totals = [t for task, t in report.per_task.items() if task not in left_out]
    records = sum(t.records for t in totals)
    return sum(t.exact_match for t in totals) / records if records else 0.0


def _show(title: str, records: list[dict[str, str]], predictions: list[str]) -> None:
    print(title)
    for record, pred in zip(records, predictions, strict=False):
        question = record["instruction"] + (f" [{record['input']}]" if record["input"] else "")
        mark = "ok" if pred.strip() == record["output"] else "--"
        print(f"  {mark} {question!r} -> {pred!r} (expected {record['output']!r})")


def _samples(records: list[dict[str, str]], n: int) -> list[int]:
    """Indices of up to `n` records from different tasks."""
    picked, tasks = [], set()
    for i, record in enumerate(records):
        if record["task"] not in tasks:
            picked.append(i)
            tasks.add(record["task"])
        if len(picked) == n:
            break
    return picked


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, seed: int = 0,
             recipe: DemoRecipe | None = None, model: str = "llama") -> dict[str, Any]:
    """Run the demo into `out_dir` with `model` (llama, or t5: an encoder-decoder on (prompt, answer)
    pairs); returns the metrics written to `<out_dir>/demo.json`."""
    from packtune.data.prompt import PromptEncoder
    from packtune.demo.curve import write_curve
    from packtune.demo.prompts import rendered_texts
    from packtune.demo.tokenizer_training import train_tokenizer
    from packtune.model.config import ModelArgs
    from packtune.model.families import build_model, encoder_decoder
    from packtune.model.hf_io import save_pretrained
    from packtune.model.loading import load_for_inference
    from packtune.run import run

    recipe = recipe or RECIPES[model, quick]
    out = Path(out_dir)
    start = time.perf_counter()
    torch.manual_seed(seed)

    train = make_split("train", recipe.records_per_task, seed, dict(recipe.task_weights))
    heldout = make_split("heldout", recipe.eval_per_task, seed)
    unseen_phrasing = make_split("heldout_phrasing", recipe.eval_per_task, seed)
    data = write_jsonl(train, out / "data" / "train.jsonl")
    write_jsonl(heldout, out / "data" / "heldout.jsonl", fields=("instruction", "input", "output", "task"))
    print(f"[1/5] data: {len(train)} training records over 8 tasks, {len(heldout)} held-out instances, "
          f"{len(unseen_phrasing)} with unseen phrasings ({out / 'data'})", flush=True)

    template = write_template(out / "template.toml")
    tokenizer = train_tokenizer(rendered_texts(train, str(template)), out / "tokenizer.model",
                                recipe.vocab_size, model_type="bpe", seed=seed)
    prompts = PromptEncoder(tokenizer, str(template))
    vocab = prompts.tokenizer.vocab_size
    print(f"[2/5] tokenizer: sentencepiece BPE, {vocab} pieces ({tokenizer})", flush=True)

    model = build_model(ModelArgs.from_hf_config(recipe.hf_config(vocab)))
    model.init_weights(torch.Generator().manual_seed(seed))
    if encoder_decoder(model):  # the prompt is the encoder's input (up to "### Response:"), EOS after it
        prompts = PromptEncoder(tokenizer, str(template), encoder_decoder=True)
    init_dir = save_pretrained(model, out / "init", tokenizer_files=[tokenizer])
    params = sum(p.numel() for p in model.parameters())
    answers = [prompts.tokenizer.encode_text(r["output"]) for r in heldout + unseen_phrasing]
    max_new = max(len(ids) for ids in answers) + 2
    before, before_pred = evaluate(model, prompts, heldout, max_new)
    shown = _samples(heldout, recipe.samples_shown)
    shape = f"{recipe.num_hidden_layers} + {recipe.num_hidden_layers} blocks" if recipe.model == "t5" else (
        f"{recipe.num_hidden_layers} layers")
    print(f"[3/5] model: {type(model).__name__}, {shape}, hidden {recipe.hidden_size}, "
          f"{params / 1e6:.2f}M parameters, random init; held-out exact match {100 * before.accuracy:.1f}%",
          flush=True)
    _show("sample generations before training:", [heldout[i] for i in shown], [before_pred[i] for i in shown])

    cfg = recipe.train_config(out, init_dir, data, tokenizer, template, seed)
    print(f"[4/5] training ({recipe.epochs} epochs, lr {recipe.lr}, "
          f"{recipe.micro_batches} packed rows of {recipe.max_tokens} tokens per step) ...", flush=True)
    train_start = time.perf_counter()
    final = run(cfg)
    train_s = time.perf_counter() - train_start
    if final is None:  # stopped by a signal: there is no trained model to evaluate
        raise TrainingError(f"the demo's training stopped before its end; its checkpoints are in "
                            f"{cfg.train.output_dir}")

    model = load_for_inference(final)
    after, after_pred = evaluate(model, prompts, heldout, max_new)
    phrasing, _ = evaluate(model, prompts, unseen_phrasing, max_new)
    _show("sample generations after training:", [heldout[i] for i in shown], [after_pred[i] for i in shown])
    curve = write_curve(cfg.train.output_dir, out / "loss_curve")
    metrics = {
        "heldout": after.to_dict(), "heldout_before_training": before.to_dict(),
        "unseen_phrasing": phrasing.to_dict(), "train_seconds": train_s,
        "total_seconds": time.perf_counter() - start, "parameters": params, "vocab_size": vocab,
        "train_rows": len(train), "model_dir": str(final), "loss_curve": str(curve),
        "recipe": recipe.__dict__, "headline": headline(after, recipe),
        "headline_before_training": headline(before, recipe),
    }
    write_atomic(out / "demo.json", json.dumps(metrics, indent=1))
    per_task = ", ".join(f"{k} {100 * v:.0f}%" for k, v in after.task_accuracy().items())
    print(f"[5/5] per task: {per_task}; unseen phrasings: {100 * phrasing.accuracy:.1f}%")
    for task, why in recipe.outside_headline:
        print(f"not in the headline: {task} ({why})")
    print(f"loss curve: {curve}; metrics: {out / 'demo.json'}; model (Hugging Face format): {final}")
    scored = f" over {len(TASKS) - len(recipe.outside_headline)} tasks" if recipe.outside_headline else ""
    print(f"held-out exact match: {100 * metrics['headline']:.1f}%{scored} "
          f"(before training: {100 * metrics['headline_before_training']:.1f}%)")
    return metrics
