"""HF Trainer + packtune: fused loss, packed rows with per-sample attention, packtune's kernels.

A tiny random Llama learns to reverse token lists (generated data, no download; CPU, seconds).
Usage: python examples/hf_trainer.py [max_steps]
"""

import random
import sys
import tempfile

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from packtune.integrations import PackedCollator, apply_packtune

config = LlamaConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    use_cache=False,
)
model = LlamaForCausalLM(config)  # or LlamaForCausalLM.from_pretrained(path)
apply_packtune(model)  # before Trainer(...); remove_packtune(model) undoes it
rng = random.Random(0)
prompts = [[rng.randrange(2, 64) for _ in range(rng.randint(3, 24))] for _ in range(512)]
data = [{"prompt_ids": p + [1], "completion_ids": p[::-1]} for p in prompts]  # 1 = separator
args = TrainingArguments(
    tempfile.mkdtemp(),
    max_steps=int(sys.argv[1]) if len(sys.argv) > 1 else 30,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,
    learning_rate=3e-3,
    logging_steps=10,
    save_strategy="no",
    report_to=[],
    remove_unused_columns=False,
    disable_tqdm=True,
)
Trainer(model=model, args=args, train_dataset=data, data_collator=PackedCollator()).train()
