"""What both sides of `packtune bench e2e` share: the prompt text, the model configs, FLOP
counting, the machine's measured matmul rate, peak memory, and the held-out loss."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_SYSTEM_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.")

MODELS: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 688},
    "large": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
              "intermediate_size": 1376},
    "moe": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 688,
            "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 128},
}
"""Llama shapes; `moe` a Qwen3-MoE (Qwen3-30B-A3B's routing: top 4 of 16 experts here, renormalised,
the load-balancing loss on at the model's coefficient, 0.001, on both sides)."""
VOCAB_SIZE = 32000


def alpaca_prompt(record: dict[str, str]) -> str:
    """Stanford Alpaca's prompt (without BOS) ending at "### Response:"; the answer follows after a space."""
    if record.get("input"):
        return (f"{ALPACA_SYSTEM_INPUT}\n\n### Instruction:\n{record['instruction']}\n\n"
                f"### Input:\n{record['input']}\n\n### Response:")
    return f"{ALPACA_SYSTEM}\n\n### Instruction:\n{record['instruction']}\n\n### Response:"


def hf_config(name: str) -> dict[str, Any]:
    """A config.json for one of `MODELS` (untied lm_head, fp32): Llama-2 style, or Qwen3-MoE for `moe`
    (transformers adds its load-balancing loss to the loss with output_router_logits, as packtune's
    `[train] router_aux_loss` does by default)."""
    shape = MODELS[name]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB_SIZE,
              "num_key_value_heads": shape["num_attention_heads"], "hidden_act": "silu",
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
              "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32", **shape}
    if "num_experts" in shape:
        config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", norm_topk_prob=True,
                      output_router_logits=True, router_aux_loss_coef=0.001,
                      head_dim=shape["hidden_size"] // shape["num_attention_heads"])
        del config["mlp_bias"]
    return config


def flops_per_token(config: dict[str, Any], context: float, lora_rank: int = 0) -> float:
    """Training FLOPs per token, as torchtitan and nanoGPT count them: 6 x the parameters the token
    passes through (every matmul weight: attention, MLP, lm_head; not the embedding lookup) plus
    12 x layers x hidden x `context` for the attention scores and their use. `context` is the
    length each token attends over: the sample's own length, since packed samples never see
    each other. No causal discount and no recomputation, the usual MFU convention.

    With `lora_rank` (adapters on all seven linears of every layer) the base is frozen: 4 x its
    parameters (forward and the input gradient, no weight gradient) plus 6 x the adapters'.

    A mixture of experts counts what a token passes through: the router and its k experts (the
    adapters of the k experts' weights with LoRA)."""
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    attention, attention_adapters = h * h * 2 + h * kv * 2, 6 * h + 2 * kv
    if "num_experts" in config:
        k, experts = config["num_experts_per_tok"], config["num_experts"]
        width = config["moe_intermediate_size"]
        mlp, mlp_adapters = k * 3 * h * width + h * experts, k * (2 * h + 3 * width)
    else:
        mlp, mlp_adapters = 3 * h * inter, 3 * h + 3 * inter
    params = layers * (attention + mlp) + h * config["vocab_size"]
    adapters = layers * lora_rank * (attention_adapters + mlp_adapters)
    return (4 if lora_rank else 6) * params + 6 * adapters + 12 * layers * h * context


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """The best fp32 matmul FLOP/s this process reaches (torch's threads, this machine): the
    ceiling CPU MFU is measured against, as a GPU's datasheet peak is."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def proc_status_bytes(field: str, pid: int | str = "self") -> int:
    """A /proc/<pid>/status field in bytes (VmRSS, VmHWM: the resident set now, its peak); 0 when it
    is absent (a process that is exiting has no memory fields left)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


_BASE_RSS = [0]


def reset_peak_rss() -> None:
    """Start a fresh high-water mark (Linux `clear_refs`), so the peak measures training alone."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    _BASE_RSS[0] = proc_status_bytes("VmRSS")


def peak_rss_since_reset() -> int:
    """Resident memory at its highest since `reset_peak_rss`, minus what was resident then."""
    return max(proc_status_bytes("VmHWM") - _BASE_RSS[0], 0)


def heldout_loss(model_dir: str, records: list[dict[str, str]]) -> float:
    """Mean cross-entropy over the answer tokens (and EOS) of `records`, one sample at a time with
    transformers' own model: one judge for every side."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            prompt = tokenizer(alpaca_prompt(record))["input_ids"]
            whole = tokenizer(alpaca_prompt(record) + " " + record["output"])["input_ids"]
            full = whole + [tokenizer.eos_token_id]
            ids = torch.tensor([full])
            labels = ids.clone()
            labels[0, :len(prompt)] = -100
            logits = model(input_ids=ids).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="sum")
            total += float(loss)
            count += int((labels[0, 1:] != -100).sum())
    return total / max(count, 1)


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(records) >= limit:
                break
            if line.strip():
                records.append(json.loads(line))
    return records
