"""`packtune bench longest-row`: the longest packed row that one LoRA training step fits on this device.

A Llama-3.2-1B-shaped model by default (hidden 2048, 16 layers, 32 query / 8 kv heads of 64, MLP 8192,
vocabulary 128256, tied embeddings; random weights, nothing downloaded) with LoRA (rank 16 on every
linear) trains one step of packtune's Trainer (forward, backward, AdamW on the adapters) on one packed
row of `--sample-tokens`-token samples, with activation checkpointing, the tiled MLP ("auto") and the
chunked loss, and with `--offload` activation offload too; on CUDA the frozen base is stored in bf16 and
the adapters in fp32, computing in bf16 (the Trainer's mixed precision), as a LoRA run there does.

The search, in one process (the model is built once): a step at `--start` tokens and one at twice that
give a line of peak memory against tokens; the longest row the line fits within 95 % of the device's
memory (whole samples) is tried next, and if it runs out of memory, 90 % of it once. A row past `--max`
is not tried, nor one whose step would not end within `--time-budget` seconds (predicted from the last
step: the time grows with the row, the samples being of a fixed length). Each step's peak is
`torch.cuda.max_memory_allocated` (on the CPU the process's peak resident set); the report names the
longest row that trained and, when the search stopped short of memory, why. `--model llama-8b` is
Llama-3.1-8B's shape (hidden 4096, 32 layers, MLP 14336, untied), the issue's target of at least 256K
tokens per row on one 80 GB GPU (with `--offload`: the block inputs in host memory); `--model tiny` a
2-layer toy with a 512-token vocabulary, for checking the search on the CPU (make gpu-check's smoke
mode).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from packtune.atomic_write import write_atomic
from packtune.bench.e2e_common import proc_status_bytes
from packtune.bench.memory import LORA_RANK, packed_batch, packed_samples

SHAPE_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                rope_theta=500000.0, rms_norm_eps=1e-5)
SHAPE_8B = dict(SHAPE_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                tie_word_embeddings=False)
SHAPE_TINY = dict(SHAPE_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MODELS = {"llama-1b": ("Llama-3.2-1B", SHAPE_1B), "llama-8b": ("Llama-3.1-8B", SHAPE_8B),
          "tiny": ("a 2-layer toy", SHAPE_TINY)}
FILL = 0.95
"""The share of the device's memory the predicted row may take (the rest: allocator slack)."""
BACK_OFF = 0.9
"""After running out of memory, the one retry's share of the row that failed."""


class OutOfMemory(Exception):
    """A step that did not fit (torch.OutOfMemoryError on the device)."""


def search(step: Callable[[int], tuple[int, float]], *, start: int, longest: int, capacity: int, sample: int,
           time_budget: float, clock: Callable[[], float] = time.perf_counter,
           report: Callable[[dict[str, Any]], None] = lambda attempt: None) -> dict[str, Any]:
    """Run `step(tokens) -> (peak bytes, seconds)` at `start`, 2 x `start`, then at the row the line
    through those two fits in FILL x `capacity`, backing off once to BACK_OFF of it after OutOfMemory.
    Rows are whole `sample`s, at most `longest`; a step predicted to end past `time_budget` seconds
    from now is not run; a step that fails otherwise ends the search. Each attempt goes to `report` as
    it ends. Returns the attempts, the longest row that trained and why the search stopped."""
    began = clock()
    attempts: list[dict[str, Any]] = []

    def fits_in_time(tokens: int) -> bool:
        done = [a for a in attempts if "seconds" in a]
        if not done:
            return True
        per_token = done[-1]["seconds"] / done[-1]["tokens"]
        return clock() - began + per_token * tokens <= time_budget

    def attempt(tokens: int) -> bool:
        try:
            peak, seconds = step(tokens)
            attempts.append({"tokens": tokens, "peak_bytes": peak, "seconds": seconds})
        except OutOfMemory as e:
            attempts.append({"tokens": tokens, "error": f"out of memory: {e}"})
        except RuntimeError as e:  # e.g. a step after an out-of-memory that left the run unusable
            attempts.append({"tokens": tokens, "error": f"failed: {str(e).splitlines()[0]}", "fatal": True})
        report(attempts[-1])
        return "error" not in attempts[-1]

    def whole(tokens: float) -> int:
        return int(tokens) // sample * sample

    stop = None
    for tokens in (start, 2 * start):
        if tokens > longest:
            stop = f"the next row ({tokens} tokens) is past --max"
            break
        if not fits_in_time(tokens):
            stop = f"the next row ({tokens} tokens) would not end within the {time_budget:g} s budget"
            break
        if not attempt(tokens):
            stop = attempts[-1]["error"].split(":")[0]
            break
    line = None
    if stop is None:
        (t0, p0), (t1, p1) = ((a["tokens"], a["peak_bytes"]) for a in attempts[:2])
        slope = max((p1 - p0) / (t1 - t0), 1.0)
        target = whole((FILL * capacity - (p0 - slope * t0)) / slope)
        line = {"bytes_per_token": slope, "intercept_bytes": p0 - slope * t0, "predicted_tokens": target}
        tokens, capped = min(target, whole(longest)), target > longest
        for retry in (False, True):
            if retry:
                tokens = whole(BACK_OFF * tokens)
            if tokens <= t1:
                stop = f"no row past {t1} tokens fits: the line predicts {target}" if not retry else \
                    f"out of memory; {BACK_OFF:.0%} of that row is no longer than one that trained"
                break
            if not fits_in_time(tokens):
                stop = f"the next row ({tokens} tokens) would not end within the {time_budget:g} s budget"
                break
            if attempt(tokens):
                stop = (f"trained {BACK_OFF:.0%} of the row that ran out of memory" if retry
                        else "reached --max" if capped
                        else f"trained the row the line predicts within {FILL:.0%} of the memory")
                break
            if attempts[-1].get("fatal"):
                stop = "failed"
                break
            stop = "out of memory twice" if retry else "out of memory"
    trained = [a["tokens"] for a in attempts if "peak_bytes" in a]
    return {"attempts": attempts, "longest_trained": max(trained, default=None), "line": line,
            "stopped": stop, "capacity_bytes": capacity, "seconds": clock() - began}


def lora_step(shape: dict[str, Any], device: torch.device, sample: int, offload: bool,
              output_dir: str) -> Callable[[int], tuple[int, float]]:
    """A LoRA model of `shape` on `device` under packtune's Trainer; the returned function trains one step on
    a row of that many tokens and returns (peak bytes during the step, seconds)."""
    from packtune.config import TrainConfig
    from packtune.lora.apply import LoRASpec, apply_lora
    from packtune.model.config import ModelArgs
    from packtune.model.llama import LlamaForCausalLM
    from packtune.parallel import init_distributed
    from packtune.train import Trainer

    with torch.device(device):
        model = LlamaForCausalLM(ModelArgs(**shape))
    model.init_weights(torch.Generator(device).manual_seed(0))
    # the frozen base as a LoRA run stores it (model.dtype = "bfloat16" on a GPU), the adapters in fp32
    apply_lora(model, LoRASpec(LORA_RANK, 2.0 * LORA_RANK), torch.bfloat16 if device.type == "cuda" else None)
    cfg = TrainConfig(output_dir=output_dir, max_steps=1, progress="none", device=device.type,
                      activation_checkpointing=True, tiled_mlp="auto", offload_activations=offload)

    def batch(tokens: int):
        return packed_batch(packed_samples(tokens, sample, shape["vocab_size"]))

    warmup = batch(sample)
    trainer = Trainer(cfg, model, [[warmup]], init_distributed(device.type), log_stream=io.StringIO())
    trainer.train_step([warmup])  # kernels compiled and the optimizer's state made outside the search
    trainer.metrics.flush()

    def step(tokens: int) -> tuple[int, float]:
        row = batch(tokens)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        try:
            trainer.train_step([row])
            trainer.metrics.flush()
        except torch.OutOfMemoryError as e:
            trainer.optimizer.zero_grad(set_to_none=True)
            raise OutOfMemory(str(e).splitlines()[0]) from None
        finally:
            del row
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device), seconds
        return proc_status_bytes("VmHWM"), seconds

    return step


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="packtune bench longest-row", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-1b",
                        help="the shape: llama-1b, llama-8b, or tiny (checks the search on a CPU)")
    parser.add_argument("--sample-tokens", type=int, default=4096, help="tokens per packed sample")
    parser.add_argument("--start", type=int, default=65536, help="the first row's tokens (then twice that)")
    parser.add_argument("--max", type=int, default=1 << 22, help="no row past this many tokens")
    parser.add_argument("--offload", action="store_true", help="activation offload as well")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="the memory to fill (default: the device's; on a CPU required)")
    parser.add_argument("--time-budget", type=float, default=40.0, help="seconds for all the steps")
    parser.add_argument("--out", default="bench_results", help="folder for longest_row.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.cap_gib is not None:
        capacity = int(args.cap_gib * 2**30)
    elif device.type == "cuda":
        capacity = torch.cuda.mem_get_info(device)[1]
    else:
        raise SystemExit("packtune bench longest-row: on a CPU give --cap-gib (the memory to fill)")
    name, model_shape = MODELS[args.model]
    shape = {**model_shape,
             "max_position_embeddings": max(args.sample_tokens, 4096)}
    print(f"packtune bench longest-row: {name} shape, LoRA rank "
          f"{LORA_RANK}, checkpointing + tiled MLP{' + offload' if args.offload else ''}, "
          f"{args.sample_tokens}-token samples, {device}, {capacity / 2**30:.1f} GiB to fill", flush=True)
    def report(a: dict[str, Any]) -> None:
        figures = (a["error"] if "error" in a else
                   f"peak {a['peak_bytes'] / 2**30:.2f} GiB, {a['seconds']:.1f} s, "
                   f"{a['tokens'] / a['seconds']:.0f} tokens/s")
        print(f"  {a['tokens']:>9} tokens: {figures}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        step = lora_step(shape, device, args.sample_tokens, args.offload, tmp)
        result = search(step, start=args.start, longest=args.max, capacity=capacity,
                        sample=args.sample_tokens, time_budget=args.time_budget, report=report)
    line = result["line"]
    if line is not None:
        print(f"  line: {line['bytes_per_token'] / 1024:.1f} KiB per token + "
              f"{line['intercept_bytes'] / 2**30:.2f} GiB; predicts {line['predicted_tokens']} tokens")
    print(f"longest row trained: {result['longest_trained']} tokens ({result['stopped']})")
    record = {"device": str(device), "model": args.model, "offload": args.offload,
              "sample_tokens": args.sample_tokens, **result}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    write_atomic(Path(args.out) / "longest_row.json", json.dumps(record, indent=1))
