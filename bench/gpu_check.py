"""`make gpu-check`: everything the CPU test suite cannot prove, in one command on one GPU.

    make gpu-check                     # on a machine with a CUDA GPU (python3's own CUDA torch)
    make gpu-check GPU_CHECK_QUICK=1   # the 5-minute second pass (or: gpu_check --quick)
    GPU_CHECK_SMOKE=1 make gpu-check   # on the CPU: tiny shapes under the Triton interpreter

Parts run one after another, each in its own process group with its own time budget: at the
budget the whole group is killed (the part's bench workers and `packtune train` included), so a
part that overruns never keeps the GPU busy under the next one. A failing part never stops the
next. `BUDGETS` holds every part's estimated time and budget per mode; the budgets add up to the
total less a margin (docs/gpu-check.md states the arithmetic). The estimates were made before any
GPU was available to the project (Triton compiles, torch.compile builds, process starts): the
per-part seconds in summary.txt are what a GPU measured.

The suites' verdicts come from their JUnit XML: a test that skips fails the part unless its
reason is one `ALLOWED_SKIPS` names (the summary prints that reason), so a missing package can
never turn a required check into a silent pass. Optional packages the GPU Python lacks (torchao,
peft, accelerate, liger_kernel) are installed without network from wheels in GPU_WHEELS (default:
.gpu-wheels/, filled by `make gpu-wheels` here, then ../shared/gpu/wheels).

Everything goes to one folder, $OUT if set, else gpu_check_out/: summary.txt and summary.json
(one line / record per part), <part>.log, suite_kernels.xml and suite_models.xml (JUnit),
bench/*.json|csv, train/train.json and train/run/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from packtune.bench.gpu_verdicts import suite_verdict

ROOT = Path(__file__).resolve().parent.parent
MODES = ("full", "quick", "smoke")
TOTAL_S = {"full": 540, "quick": 290, "smoke": 900}
"""Seconds for the whole check per mode (GPU_CHECK_TOTAL_S overrides)."""
BUDGETS = {
    #                 (estimate s, budget s) per mode; None: the part does not run in that mode
    "env":             {"full": (8, 15), "quick": (8, 15), "smoke": (15, 45)},
    "suite_kernels":   {"full": (110, 125), "quick": (70, 95), "smoke": (15, 45)},
    "suite_models":    {"full": (95, 110), "quick": (65, 90), "smoke": (15, 45)},
    "bench_ce":        {"full": (28, 32), "quick": None, "smoke": (40, 120)},
    "bench_linear_ce": {"full": (28, 32), "quick": None, "smoke": (45, 120)},
    "bench_nf4":       {"full": (15, 20), "quick": (15, 25), "smoke": (15, 60)},
    "bench_lora":      {"full": (30, 33), "quick": (20, 30), "smoke": (40, 120)},
    "train":           {"full": (60, 68), "quick": None, "smoke": (30, 120)},
    "bench_long_rows": {"full": (55, 70), "quick": None, "smoke": (20, 60)},
}
MARGIN = {"full": 35, "quick": 35, "smoke": 120}
"""Seconds of the total no budget may take: the wheel installs, the parent's own start and end,
and the slack between a budget and the killed group's exit."""
OPTIONAL_PACKAGES = ("liger_kernel", "torchao", "accelerate", "peft")
SUITES = {"suite_kernels": ["test_gpu_kernels.py", "test_gpu_lora.py", "test_gpu_moe.py",
                            "test_gpu_logprobs.py"],
          "suite_models": ["test_gpu_attention.py", "test_gpu_training.py", "test_gpu_models.py",
                           "test_gpu_long_rows.py", "test_gpu_t5_attention.py"]}
"""Every file of tests/gpu, in one suite or the other (tests/test_gpu_check.py checks none is left out)."""


def wheel_folders() -> list[Path]:
    """Where optional wheels are looked for: $GPU_WHEELS (os.pathsep-separated), else .gpu-wheels/
    (`make gpu-wheels`), then ../shared/gpu/wheels."""
    given = os.environ.get("GPU_WHEELS") or os.environ.get("LIGER_WHEELS")
    if given:
        return [Path(p) for p in given.split(os.pathsep) if p]
    return [ROOT / ".gpu-wheels", ROOT.parent / "shared" / "gpu" / "wheels"]


def ensure_wheel(package: str, env: dict[str, str], out: Path) -> str:
    """Make `package` importable (a --target install from a local wheel; no network needed)."""
    if importlib.util.find_spec(package) is not None:
        return "installed"
    wheels = [w for folder in wheel_folders() if folder.is_dir()
              for w in sorted(folder.glob(f"{package}-*.whl"))]
    if not wheels:
        return f"not installed, no wheel in {os.pathsep.join(map(str, wheel_folders()))}: its tests FAIL"
    site = out / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
               "--target", str(site), str(wheels[0])]
    proc = subprocess.run(install, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"wheel install failed: {proc.stderr.strip()[-200:]}"
    paths = env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys([str(site), *paths]) if p)
    return f"installed from {wheels[0]}"


def check_budgets(mode: str, total: float) -> None:
    """The budgets of `mode` must leave its margin of the total: refuse a plan that cannot be met."""
    planned = sum(b[mode][1] for b in BUDGETS.values() if b[mode])
    if planned + MARGIN[mode] > total:
        raise SystemExit(f"gpu-check: the {mode} budgets add up to {planned} s; with the {MARGIN[mode]} s "
                         f"margin that is over the {total:g} s total")


def plan(mode: str, total: float) -> str:
    """The parts of `mode` with their estimates and budgets, and the budget arithmetic."""
    runs = {name: b[mode] for name, b in BUDGETS.items() if b[mode]}
    lines = [f"gpu-check {mode}: {'part':<16}{'estimate s':>11}{'budget s':>10}"]
    lines += [f"{'':<{len(mode) + 12}}{name:<16}{e:>11}{b:>10}" for name, (e, b) in runs.items()]
    estimates, budgets = sum(e for e, _ in runs.values()), sum(b for _, b in runs.values())
    lines.append(f"estimates {estimates} s; budgets {budgets} s + margin {MARGIN[mode]} s = "
                 f"{budgets + MARGIN[mode]} s <= total {total:g} s")
    return "\n".join(lines)


def _suite(name: str, mode: str, out: Path) -> list[str]:
    files = [str(ROOT / "tests" / "gpu" / f) for f in SUITES[name]]
    marks = "gpu and not slow" if mode == "quick" else "gpu"
    return [sys.executable, "-P", "-m", "pytest", "-m", marks, "-q", "-p", "no:cacheprovider", "-rs",
            f"--junitxml={out / (name + '.xml')}", *files]


def _bench(subject: str, mode: str, out: Path, *options: str) -> list[str]:
    common = [sys.executable, "-m", "packtune", "bench", subject, "--out", str(out / "bench")]
    if mode == "smoke":
        return [*common, "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--warmup", "1", *options]
    return [*common, "--dtype", "bfloat16", "--repeats", "5", "--warmup", "2", *options]


def commands(mode: str, out: Path) -> dict[str, list[str]]:
    """Each part's command in `mode` (GPU shapes, or tiny CPU ones in smoke mode)."""
    py = sys.executable
    smoke = mode == "smoke"
    # eager, packtune and Liger-Kernel at Llama-3-8B shapes; torch.compile's builds (~25 s each, an
    # estimate) are left to `packtune bench` run by hand, outside the check's budget
    impls = ["--impl", "packtune"] if smoke else ["--impl", "packtune", "--impl", "liger"]
    ce = ["--shape", "64", "1000"] if smoke else ["--shape", "8192", "128256", "--ignored", "0.3"]
    linear = (["--shape", "64", "32", "1000"] if smoke
              else ["--shape", "8192", "4096", "128256", "--ignored", "0.3"])
    nf4 = ["--tokens", "16", "--hidden", "64", "--inter", "128"] if smoke else ["--tokens", "8192"]
    dropouts = ["0.1"] if mode != "full" else ["0", "0.1"]
    tiny_rows = ["--model", "tiny", "--device", "cpu", "--sample-tokens", "64", "--start", "128",
                 "--max", "512", "--cap-gib", "20"]
    long_rows = tiny_rows if smoke else ["--start", "32768", "--time-budget", "40"]
    lora = ["--impl", "peft", "--impl", "packtune", "--ops", "mlp", "--ranks", "16", "--dropout", *dropouts,
            *(["--tokens", "64", "--scale", "64"] if smoke else ["--tokens", "8192", "--scale", "1"])]
    return {
        "env": [py, "-m", "packtune", "env"],
        "suite_kernels": _suite("suite_kernels", mode, out),
        "suite_models": _suite("suite_models", mode, out),
        "bench_ce": _bench("ce", mode, out, *ce, *impls),
        "bench_linear_ce": _bench("linear-ce", mode, out, *linear, *impls),
        "bench_nf4": _bench("nf4", mode, out, *nf4),
        "bench_lora": _bench("lora", mode, out, *lora),
        "train": [py, "-m", "packtune.bench.gpu_train", str(out / "train"), *(["--smoke"] if smoke else [])],
        "bench_long_rows": [py, "-m", "packtune", "bench", "longest-row", "--out", str(out / "bench"),
                            *long_rows],
    }


def run_part(cmd: list[str], log: Path, env: dict[str, str], budget: float) -> tuple[int, float]:
    """Run `cmd` in a new process group, its output (decoded text) streamed to `log`; at `budget`
    seconds SIGTERM then SIGKILL the whole group. Returns (exit status, 124 when killed; seconds).
    Whatever the group left running after its leader exits is killed too."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8", errors="replace") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        sink.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            rc = 124
        finally:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if rc == 124:
            sink.write(f"\n[gpu-check: killed with its process group at its {budget:.0f} s budget]\n")
    return rc, time.perf_counter() - start


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def verdict(name: str, rc: int, log: str, out: Path, mode: str) -> str:
    """PASS / FAIL / SKIP (with why) for one finished part."""
    if rc == 124:
        return "FAIL (killed at its time budget)"
    if name in SUITES:
        return suite_verdict(out / f"{name}.xml", rc, smoke=mode == "smoke")
    if name.startswith("bench") and "failed:" in log:
        return "FAIL (an implementation failed; see the log)"
    return "PASS" if rc == 0 else f"FAIL (exit {rc}; see {name}.log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m packtune.bench.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("GPU_CHECK_QUICK") == "1",
                        help="the second pass: the suites (bf16, no > 2^31 shapes), the NF4 and LoRA benches")
    parser.add_argument("--plan", action="store_true", help="print the parts and their budgets, run nothing")
    args = parser.parse_args(argv)
    mode = "smoke" if os.environ.get("GPU_CHECK_SMOKE") == "1" else "quick" if args.quick else "full"
    total = float(os.environ.get("GPU_CHECK_TOTAL_S") or TOTAL_S[mode])
    check_budgets(mode, total)
    if args.plan:
        print(plan(mode, total))
        return 0
    out = Path(os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if mode != "smoke" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; GPU_CHECK_SMOKE=1 runs the smoke mode on the CPU",
              file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k not in ("PACKTUNE_BACKEND", "TRITON_INTERPRET")}
    env.update(PYTHONUNBUFFERED="1", GPU_CHECK_QUICK="1" if mode == "quick" else "0",
               **({"TRITON_INTERPRET": "1"} if mode == "smoke" else {}))
    start = time.perf_counter()
    records = [{"part": f"wheel {p}", "status": "SKIP (smoke mode: GPU only)" if mode == "smoke"
                else ensure_wheel(p, env, out)} for p in OPTIONAL_PACKAGES]
    print(f"gpu-check ({mode}), writing to {out}; budget {total:g} s", flush=True)
    for name, cmd in commands(mode, out).items():
        if BUDGETS[name][mode] is None:
            continue
        estimate, budget = BUDGETS[name][mode]
        left = total - (time.perf_counter() - start)
        record = {"part": name, "estimate_s": estimate, "budget_s": budget}
        if left < 10:
            records.append({**record, "status": "FAIL (not run: the total time budget is spent)"})
            continue
        rc, seconds = run_part(cmd, out / f"{name}.log", env, min(budget, left))
        log = (out / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        records.append({**record, "status": verdict(name, rc, log, out, mode), "seconds": round(seconds, 1)})
        print(f"{name:<16}{records[-1]['status']}  ({seconds:.1f} s of {budget} s)", flush=True)
    seconds = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps({"mode": mode, "smoke": mode == "smoke", "total_s": total,
                                                  "seconds": seconds, "parts": records}, indent=1))
    lines = [f"{r['part']:<20}{r['status']}" + (f"  [{r['seconds']} s of {r['budget_s']} s]" if "seconds" in r
                                                 else "") for r in records]
    (out / "summary.txt").write_text("\n".join(lines) + f"\ntotal {seconds} s of {total:g} s, mode={mode}\n")
    failed = [r["part"] for r in records if r["status"].startswith("FAIL")]
    print(f"gpu-check: {seconds} s, {'all parts passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"see {out / 'summary.txt'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
