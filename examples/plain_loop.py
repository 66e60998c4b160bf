"""A plain PyTorch loop with packtune's fused loss and the global label-token count.

Packed rows from `pack_samples` + `PackedCollator`, a model that returns final hidden states
(here packtune's own Llama, which takes packed rows natively), and `linear_cross_entropy` with
the lm_head inside, so no [tokens, vocab] logits exist. Each optimizer step sums the token losses
of its micro-batches and divides by the step's label-token count, counted on the host before the
micro-batch loop: gradient accumulation then equals one big batch (with data parallelism,
all-reduce that count across ranks too). Tiny random model, generated data, CPU.
Usage: python examples/plain_loop.py [steps]
"""

import random
import sys

import torch

from packtune.integrations import PackedCollator, pack_samples
from packtune.kernels import linear_cross_entropy
from packtune.model.config import ModelArgs
from packtune.model.llama import LlamaForCausalLM

torch.manual_seed(0)
args = ModelArgs.from_hf_config(
    dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)
model = LlamaForCausalLM(args)
model.init_weights()
rng = random.Random(0)
prompts = [[rng.randrange(2, 64) for _ in range(rng.randint(3, 24))] for _ in range(512)]
samples = [{"prompt_ids": p + [1], "completion_ids": p[::-1]} for p in prompts]  # learn to reverse
rows = pack_samples(samples, max_tokens=256)
collate = PackedCollator(batch_dim=False)  # [T] tensors, labels already shifted per sample
micro_batches, steps = 2, int(sys.argv[1]) if len(sys.argv) > 1 else 40
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)


def shuffled_rows():
    while True:
        rng.shuffle(rows)
        yield from rows


stream = shuffled_rows()
for step in range(steps):
    batches = [collate([next(stream)]) for _ in range(micro_batches)]
    num_items = torch.tensor(sum(b["num_label_tokens"] for b in batches))  # the whole step's count
    total = 0.0
    for b in batches:
        layout = b["packed_layout"]  # positions, sample offsets and label rows, built on the host
        hidden = model.hidden_states(b["input_ids"], layout)
        loss = linear_cross_entropy(
            hidden, model.lm_head, b["shift_labels"], reduction="sum", num_items=num_items, layout=layout
        )
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 10 == 0 or step == steps - 1:
        print(f"step {step:3d}  loss {total:.4f}  label tokens {int(num_items)}")
