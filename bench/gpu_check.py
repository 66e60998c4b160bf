"""`make gpu-check`: everything the CPU test suite cannot prove, in one command on one GPU.

    make gpu-check                     # on a machine with a CUDA GPU (uses python3's own CUDA torch)
    GPU_CHECK_SMOKE=1 make gpu-check   # on the CPU: tiny shapes under the Triton interpreter

Parts, each a subprocess with its own time cap (a failing part never stops the next):

  env      `packtune env`: versions, GPU, and the path each op and attention takes
  suite    `pytest -m gpu`: every Triton kernel compiled against the float64 reference (fp32 / bf16
           / fp16, odd shapes, > 2^31 elements), each attention path against the per-sample
           reference, no host syncs in a training step, CUDA-graph capture of the loss,
           torch.compile without graph breaks, a bf16 FSDP2 step of a 1B-shaped Llama
  bench    `packtune bench ce` and `linear-ce` at Llama-3-8B shapes (N=8192, H=4096, V=128256,
           bf16): torch eager, torch.compile, packtune, and Liger-Kernel when it imports
  train    `packtune train` on a random-init 1B-shaped Llama (packtune.bench.gpu_train): tokens/s, MFU
  bench_lora  `packtune bench lora` at Llama-7B widths (T=8192, bf16, ranks 16 and 64): PEFT eager and
           compiled against packtune's Triton LoRA linear / MLP; last, so it runs in what is left

Optional packages the GPU Python lacks are installed first, without network or dependencies,
from wheels in $GPU_WHEELS (default /work/shared/gpu/wheels; $LIGER_WHEELS is still read):
liger_kernel (the bench's Liger side), torchao (the NF4 / QLoRA GPU tests, which skip without
it), peft and accelerate (`bench lora`'s PEFT sides). A GPU session can `pip download --no-deps
torchao peft accelerate -d DIR` on a machine with an index and carry DIR with the repository.

Everything goes to one folder, $OUT if set, else gpu_check_out/: summary.txt and summary.json
(one line / record per part), <part>.log, suite.xml (JUnit), bench/*.json|csv, train/train.json
and train/run/metrics.jsonl. The parts share a 7.5-minute budget (GPU_CHECK_TOTAL_S, default 450).
In smoke mode the GPU-only parts (the suite's tests, torch.compile and Liger in the bench) report
as skipped: smoke mode checks this script, not the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT") or "gpu_check_out").resolve()
TOTAL_S = float(os.environ.get("GPU_CHECK_TOTAL_S", "450"))
GPU_WHEELS = Path(os.environ.get("GPU_WHEELS") or os.environ.get("LIGER_WHEELS")
                  or "/work/shared/gpu/wheels")
OPTIONAL_PACKAGES = ("liger_kernel", "torchao", "accelerate", "peft")
"""Installed from a wheel in GPU_WHEELS when the GPU Python lacks them (see the module docstring)."""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PACKTUNE_BACKEND", None)
    if SMOKE:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def ensure_wheel(package: str, env: dict[str, str]) -> str:
    """Make `package` importable (a --target install from a local wheel; no network needed)."""
    if importlib.util.find_spec(package) is not None:
        return "installed"
    wheels = sorted(GPU_WHEELS.glob(f"{package}-*.whl")) if GPU_WHEELS.is_dir() else []
    if not wheels:
        return f"not installed, no wheel in {GPU_WHEELS}: skipped"
    site = OUT / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--upgrade",
            "--target",
            str(site),
            str(wheels[-1]),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return f"wheel install failed: {proc.stderr.strip()[-200:]}"
    paths = env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys([str(site), *paths]) if p)
    return f"installed from {wheels[-1].name}"


def _lora_bench_args() -> list[str]:
    """`packtune bench lora`: packtune's LoRA linear / MLP against PEFT, at Llama-7B widths on the GPU."""
    common = [sys.executable, "-m", "packtune", "bench", "lora", "--out", str(OUT / "bench")]
    if SMOKE:
        return [*common, "--impl", "peft", "--impl", "packtune", "--device", "cpu", "--dtype", "float32",
                "--tokens", "64", "--scale", "64", "--ranks", "16", "--ops", "linear", "--repeats", "1",
                "--warmup", "1"]
    return [*common, "--dtype", "bfloat16", "--tokens", "8192", "--scale", "1", "--ranks", "16", "64",
            "--repeats", "5", "--warmup", "2"]


def _bench_args(subject: str) -> list[str]:
    common = [sys.executable, "-m", "packtune", "bench", subject, "--out", str(OUT / "bench")]
    if SMOKE:  # eager and packtune: torch.compile and Liger's Triton kernels belong to the GPU run
        shape = ["--shape", "64", "1000"] if subject == "ce" else ["--shape", "64", "32", "1000"]
        smoke = [
            "--impl",
            "packtune",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--repeats",
            "1",
            "--warmup",
            "1",
        ]
        return [*common, *shape, *smoke]
    shape = ["--shape", "8192", "128256"] if subject == "ce" else ["--shape", "8192", "4096", "128256"]
    return [*common, *shape, "--dtype", "bfloat16", "--ignored", "0.3", "--repeats", "5", "--warmup", "2"]


def parts() -> list[tuple[str, list[str], float]]:
    """(name, command, cap in seconds)."""
    py = sys.executable
    tests = ROOT / "tests" / "gpu" if SMOKE else ROOT / "tests"  # smoke: collect the GPU suite only
    suite = [
        py,
        "-P",
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={OUT / 'suite.xml'}",
        str(tests),
    ]
    train = [py, "-m", "packtune.bench.gpu_train", str(OUT / "train"), *(["--smoke"] if SMOKE else [])]
    return [
        ("env", [py, "-m", "packtune", "env"], 30),
        ("suite", suite, 60 if SMOKE else 160),
        ("bench_ce", _bench_args("ce"), 60 if SMOKE else 80),
        ("bench_linear_ce", _bench_args("linear-ce"), 60 if SMOKE else 80),
        ("train", train, 90 if SMOKE else 120),
        ("bench_lora", _lora_bench_args(), 60),
    ]


def verdict(name: str, rc: int, log: str) -> str:
    """PASS / FAIL / SKIP for one part from its exit status and output."""
    if name == "suite":
        tail = log.strip().splitlines()[-1:] or [""]
        if SMOKE and "skipped" in tail[0] and "failed" not in tail[0] and "error" not in tail[0]:
            return f"SKIP (no CUDA: {tail[0].strip('= ')})"
        return f"{'PASS' if rc == 0 else 'FAIL'} ({tail[0].strip('= ')})"
    if name.startswith("bench") and "failed:" in log:
        return "FAIL (an implementation failed; see the log)"
    return "PASS" if rc == 0 else f"FAIL (exit {rc})"


def main() -> int:
    import torch

    OUT.mkdir(parents=True, exist_ok=True)
    if not SMOKE and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here; GPU_CHECK_SMOKE=1 runs the smoke mode on the CPU",
            file=sys.stderr,
        )
        return 2
    env = _env()
    start = time.perf_counter()
    records = [{"part": f"wheel {package}", "status": "SKIP (smoke mode: GPU only)" if SMOKE
                else ensure_wheel(package, env)} for package in OPTIONAL_PACKAGES]
    if SMOKE:
        records.append({"part": "bench torch.compile, liger", "status": "SKIP (smoke mode: GPU only)"})
    print(f"gpu-check ({'SMOKE on CPU' if SMOKE else 'GPU'}), writing to {OUT}", flush=True)
    for name, cmd, cap in parts():
        left = TOTAL_S - (time.perf_counter() - start)
        t = time.perf_counter()
        if left < 10:
            records.append({"part": name, "status": "FAIL (not run: the total time budget is spent)"})
            continue
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(cap, left)
            )
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = 124, f"{e.stdout or ''}{e.stderr or ''}\n[killed at its {min(cap, left):.0f}s cap]"
            log = log if isinstance(log, str) else log.decode(errors="replace")
        (OUT / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{log}")
        status = "FAIL (killed at its time cap)" if rc == 124 else verdict(name, rc, log)
        records.append({"part": name, "status": status, "seconds": round(time.perf_counter() - t, 1)})
        print(f"{name:<16}{status}  ({records[-1]['seconds']}s)", flush=True)
    total = round(time.perf_counter() - start, 1)
    (OUT / "summary.json").write_text(
        json.dumps({"smoke": SMOKE, "seconds": total, "parts": records}, indent=1)
    )
    (OUT / "summary.txt").write_text(
        "".join(f"{r['part']:<20}{r['status']}\n" for r in records) + f"total {total}s, smoke={SMOKE}\n"
    )
    failed = [r["part"] for r in records if r["status"].startswith("FAIL")]
    print(
        f"gpu-check: {total}s, {'all parts passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
        f"see {OUT / 'summary.txt'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
