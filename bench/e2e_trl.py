"""The baseline side of `packtune bench e2e`: Hugging Face transformers + TRL `SFTTrainer`.

Runs in a fresh process (see e2e.py). Prompt/completion records with `completion_only_loss`, as a
user of TRL would set up Alpaca data, in two modes: `padding` (right-padded micro-batches, the
Stanford Alpaca recipe's layout) and `packing` (`packing_strategy="bfd"`, which TRL runs
padding-free with per-sample `position_ids`; on CPU transformers turns those into a
block-diagonal SDPA mask, so no sample attends to another). Both in fp32 without activation
checkpointing, as packtune runs on CPU: TRL's defaults (bf16 autocast, gradient checkpointing)
would make it several times slower here, which is not the comparison a user asks for. With
`lora_rank`, TRL trains a PEFT LoRA adapter (`peft_config`) and the merged model is saved.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from packtune.bench.e2e_common import alpaca_prompt, peak_rss_since_reset, reset_peak_rss


def _dataset(data_path: str, rows: int):
    from datasets import Dataset

    records = []
    with open(data_path, encoding="utf-8") as f:
        for line in f:
            if len(records) == rows:
                break
            record = json.loads(line)
            records.append({"prompt": alpaca_prompt(record), "completion": " " + record["output"]})
    return Dataset.from_list(records)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train `spec["rows"]` rows for one epoch from the model at `spec["init_dir"]`; returns the
    measurement (tokens, seconds, peak memory, losses) and saves the model to `spec["out_dir"]`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(spec["seed"])
    packing = spec["mode"] == "packing"
    tokenizer = AutoTokenizer.from_pretrained(spec["init_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["init_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    config = SFTConfig(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=spec["rows_per_micro_batch" if packing else "samples_per_micro_batch"],
        gradient_accumulation_steps=spec["micro_batches"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        num_train_epochs=1,
        seed=spec["seed"],
        data_seed=spec["seed"],
        completion_only_loss=True,
        packing=packing,
        packing_strategy="bfd",
        max_length=spec["max_tokens"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = None
    if spec.get("lora_rank"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=_dataset(spec["data"], spec["rows"]),
                         processing_class=tokenizer, peft_config=peft_config)
    columns = trainer.train_dataset
    real_tokens = sum(sum(1 for _ in ids) for ids in columns["input_ids"])
    label_tokens = sum(sum(1 for t in labels if t != -100) for labels in columns["labels"])
    samples = sum(len(s) for s in columns["seq_lengths"]) if packing else len(columns)
    reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = peak_rss_since_reset()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if peft_config is not None:
        trainer.model.merge_and_unload().save_pretrained(spec["out_dir"])
        tokenizer.save_pretrained(spec["out_dir"])
    else:
        trainer.save_model(spec["out_dir"])
    Path(spec["out_dir"], "log_history.json").write_text(json.dumps(trainer.state.log_history))
    return {"train_s": seconds, "steps": trainer.state.global_step, "samples": samples,
            "real_tokens": real_tokens, "label_tokens": label_tokens, "peak_bytes": peak,
            "train_losses": losses, "model_dir": spec["out_dir"]}
