"""`packtune bench nf4`: QLoRA's base GEMMs over an NF4 weight, the fused kernel against dequantise + cuBLAS.

For each layer shape (hidden -> inter and inter -> hidden: Llama-7B's 4096 and 11008 by default,
multiples of the NF4 block of 64) and each
GEMM (`forward`: x deq(W)^T; `dx`: g deq(W)), times in one process, on the same inputs:

- `torchao`: torchao's own dequantisation + matmul (what the `torch` backend runs: the baseline);
- `kernel`: the fused Triton kernel (codes decoded in registers, autotuned tiles on CUDA);
- `dequant`: the Triton dequantise kernel into a scratch weight, then the cuBLAS GEMM;

and prints which of the two Triton paths `nf4_path` chose for that shape at run time (the cached
choice a training step then uses without a host sync). Needs torchao.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from packtune.bench import harness


def _timer(device: str, fn, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def measure(n_out: int, n_in: int, tokens: int, op: str, dtype: torch.dtype, device: str, warmup: int,
            repeats: int) -> dict:
    """Median seconds of the three implementations of one NF4 GEMM, and the path `nf4_path` picks."""
    from packtune.kernels.nf4_matmul import nf4_dequantize, nf4_matmul_dx, nf4_matmul_forward, nf4_path
    from packtune.lora.qlora import to_nf4

    weight = to_nf4(torch.randn(n_out, n_in, device=device) / n_in**0.5)
    a = torch.randn(tokens, n_in if op == "forward" else n_out, device=device, dtype=dtype)
    forward = op == "forward"

    def torchao():
        w = weight.get_original_weight().to(dtype)
        return a @ (w.t() if forward else w)

    def dequant():
        w = nf4_dequantize(weight, dtype)
        return a @ (w.t() if forward else w)

    def kernel():
        return nf4_matmul_forward(a, weight) if forward else nf4_matmul_dx(a, weight)

    runs = {"torchao": torchao, "kernel": kernel, "dequant": dequant}
    with torch.no_grad():
        seconds = {name: _timer(device, fn, warmup, repeats) for name, fn in runs.items()}
        chosen = nf4_path(op, a, weight)
    return {"op": op, "out": n_out, "in": n_in, "tokens": tokens, "seconds": seconds, "chosen": chosen}


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("nf4", __doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=11008)
    args = parser.parse_args(argv)
    hidden, inter = args.hidden, args.inter
    if hidden % 64 or inter % 64:
        parser.error(f"--hidden {hidden} and --inter {inter} must be multiples of the NF4 block (64)")
    dtype = getattr(torch, args.dtype)
    env = harness.environment()
    print(f"packtune bench nf4: {args.device}, {args.dtype}, {env['machine']}, torch {env['torch']}")
    print(f"{'GEMM':<26}{'torchao ms':>12}{'kernel ms':>11}{'dequant ms':>12}  run-time choice")
    rows = []
    for n_out, n_in in ((inter, hidden), (hidden, inter)):
        for op in ("forward", "dx"):
            row = measure(n_out, n_in, args.tokens, op, dtype, args.device, args.warmup, args.repeats)
            rows.append({**row, **env, "dtype": args.dtype, "device": args.device})
            ms = {k: 1e3 * v for k, v in row["seconds"].items()}
            label = f"{op} {n_in}->{n_out} x{args.tokens}"
            print(f"{label:<26}{ms['torchao']:>12.2f}{ms['kernel']:>11.2f}{ms['dequant']:>12.2f}  "
                  f"{row['chosen']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nf4.json").write_text(json.dumps(rows, indent=1))
    print(f"results: {out / 'nf4.json'}")
