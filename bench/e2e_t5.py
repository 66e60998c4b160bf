"""The T5 sides of `packtune bench e2e --model t5`: FLAN-T5-style fine-tuning of a T5 v1.1 on the same
(prompt, answer) pairs, packtune's packed pairs against transformers' `Seq2SeqTrainer`.

The baseline is how FLAN-T5 is usually fine-tuned in PyTorch: `Seq2SeqTrainer` with
`DataCollatorForSeq2Seq` (every micro-batch padded to its longest input and its longest target, the
labels' padding -100), fp32, no gradient checkpointing, on transformers' own T5 with its SDPA-less
attention (T5 computes its relative position bias per padded batch). Both sides read identical token
ids: the Alpaca prompt (bench/e2e_common.py) and the answer, each encoded by the bench's sentencepiece
model with EOS appended, as T5's tokenizer does. One judge, transformers' T5 in eval mode, scores every
side's final weights: the mean cross-entropy of the held-out answers' tokens (EOS included).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from packtune.bench.e2e_common import VOCAB_SIZE, alpaca_prompt, peak_rss_since_reset, reset_peak_rss

T5_MODELS: dict[str, dict[str, Any]] = {
    "t5": {"d_model": 256, "d_kv": 64, "d_ff": 688, "num_layers": 4, "num_heads": 4},
}
"""T5 v1.1 shapes beside e2e_common.MODELS' Llama ones ("t5": the width and depth of "small", per stack)."""
EOS_ID, PAD_ID = 2, 3
"""The bench tokenizer's (Llama's layout: unk 0, bos 1, eos 2, pad 3); T5 starts its decoder with pad."""


def t5_config(name: str) -> dict[str, Any]:
    """config.json of a T5 v1.1 (gated-GELU, its own head, no output scaling) of shape `name`, fp32."""
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": VOCAB_SIZE,
            "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0,
            "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "decoder_start_token_id": PAD_ID,
            "torch_dtype": "float32", **T5_MODELS[name]}


def init_model(init_dir: Path, name: str, tokenizer_model: Path, seed: int) -> None:
    """A random T5 of transformers' own init, saved with the bench's tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    dropped = ("architectures", "model_type", "torch_dtype")
    config = {k: v for k, v in t5_config(name).items() if k not in dropped}
    T5ForConditionalGeneration(T5Config(**config)).save_pretrained(init_dir)
    shutil.copy(tokenizer_model, init_dir / "tokenizer.model")
    (init_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=1))


def encode_pairs(tokenizer_model: str | Path, records: list[dict[str, str]]
                 ) -> list[tuple[list[int], list[int]]]:
    """(input ids, target ids) of each record: the Alpaca prompt and the answer, EOS after each."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    prompts = sp.encode([alpaca_prompt(r) for r in records])
    answers = sp.encode([r["output"] for r in records])
    return [([*p, EOS_ID], [*a, EOS_ID]) for p, a in zip(prompts, answers, strict=True)]


def pair_flops_per_token(name: str, pairs: list[tuple[int, int]]) -> float:
    """Training FLOPs per real token over (input length, target length) pairs, as packtune counts them
    (`families.t5.pair_flops`)."""
    from packtune.model.config import ModelArgs
    from packtune.model.families.t5 import pair_flops

    args = ModelArgs.from_hf_config(t5_config(name))
    return sum(pair_flops(args, i, t) for i, t in pairs) / max(sum(i + t for i, t in pairs), 1)


def run_seq2seq_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """Train `spec["rows"]` records for one epoch with Seq2SeqTrainer from `spec["init_dir"]`; returns the
    measurement and saves the model to `spec["out_dir"]`."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    from packtune.bench.e2e_common import read_jsonl

    torch.manual_seed(spec["seed"])
    pairs = encode_pairs(spec["tokenizer"], read_jsonl(spec["data"], spec["rows"]))
    dataset = Dataset.from_list([{"input_ids": i, "attention_mask": [1] * len(i), "labels": t}
                                 for i, t in pairs])
    tokenizer = AutoTokenizer.from_pretrained(spec["init_dir"])
    model = AutoModelForSeq2SeqLM.from_pretrained(spec["init_dir"], dtype=torch.float32)
    config = Seq2SeqTrainingArguments(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["samples_per_micro_batch"],
        gradient_accumulation_steps=spec["micro_batches"], learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=spec["warmup"], weight_decay=0.0, max_grad_norm=1.0,
        num_train_epochs=1, seed=spec["seed"],
        data_seed=spec["seed"], logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=model, args=config, train_dataset=dataset, data_collator=collator)
    reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = peak_rss_since_reset()
    trainer.save_model(spec["out_dir"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    Path(spec["out_dir"], "log_history.json").write_text(json.dumps(trainer.state.log_history))
    return {"train_s": seconds, "steps": trainer.state.global_step, "samples": len(pairs),
            "real_tokens": sum(len(i) + len(t) for i, t in pairs),
            "label_tokens": sum(len(t) for _, t in pairs),
            "peak_bytes": peak, "train_losses": losses, "model_dir": spec["out_dir"]}


def heldout_loss(model_dir: str, records: list[dict[str, str]], tokenizer_model: str | Path) -> float:
    """Mean cross-entropy over the answer tokens (and EOS) of `records`, one pair at a time with
    transformers' T5: one judge for every side."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for source, target in encode_pairs(tokenizer_model, records):
            labels = torch.tensor([target])
            logits = model(input_ids=torch.tensor([source]), labels=labels).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits, labels[0], reduction="sum"))
            count += len(target)
    return total / max(count, 1)
