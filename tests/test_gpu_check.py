"""`make gpu-check` on the CPU: its smoke mode runs every part to the end within its budget; the
budgets add up; a part that overruns is killed with its whole process group; a required test that
skips fails the suite's verdict; optional wheels install from the carried folders."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from packtune.bench import gpu_check
from packtune.bench.gpu_verdicts import suite_verdict

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_mode_runs_every_part_within_its_budget(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "OUT": str(tmp_path / "out")}
    total = gpu_check.TOTAL_S["smoke"]
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=total + 60)
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    parts = {r["part"]: r for r in summary["parts"]}
    assert summary["mode"] == "smoke" and summary["seconds"] <= total
    for suite in ("suite_kernels", "suite_models"):
        assert parts[suite]["status"].startswith("SKIP (no CUDA"), parts[suite]
    for name in ("env", "bench_ce", "bench_linear_ce", "bench_nf4", "bench_lora", "train", "bench_long_rows"):
        assert parts[name]["status"] == "PASS", parts[name]
    for name, budgets in gpu_check.BUDGETS.items():
        assert parts[name]["seconds"] <= budgets["smoke"][1], parts[name]
    for name in ("summary.txt", "env.log", "suite_kernels.log", "suite_kernels.xml", "suite_models.xml",
                 "bench/ce.json", "bench/linear_ce.json", "bench/nf4.json", "bench/lora.json",
                 "train/train.json", "train/run/metrics.jsonl", "bench/longest_row.json"):
        assert (out / name).exists(), name
    assert "SDPA over length buckets" in (out / "env.log").read_text()
    assert "b'" not in (out / "summary.txt").read_text()


@pytest.mark.parametrize("mode", gpu_check.MODES)
def test_budgets_leave_their_margin_of_the_total(mode):
    """The arithmetic docs/gpu-check.md states: each part's estimate within its budget, the budgets
    plus the margin within the total, and the quick pass within 5 minutes."""
    runs = [b[mode] for b in gpu_check.BUDGETS.values() if b[mode]]
    assert all(estimate <= budget for estimate, budget in runs)
    assert sum(budget for _, budget in runs) + gpu_check.MARGIN[mode] <= gpu_check.TOTAL_S[mode]
    gpu_check.check_budgets(mode, gpu_check.TOTAL_S[mode])
    assert gpu_check.TOTAL_S["quick"] <= 300 and gpu_check.TOTAL_S["full"] <= 540
    with pytest.raises(SystemExit, match=f"the {mode} budgets add up to"):
        gpu_check.check_budgets(mode, sum(budget for _, budget in runs))


def test_every_gpu_test_file_is_in_a_suite():
    """A file of tests/gpu outside SUITES would never run on a GPU (two were left out before)."""
    files = sorted(p.name for p in (ROOT / "tests" / "gpu").glob("test_*.py"))
    suites = [f for names in gpu_check.SUITES.values() for f in names]
    assert sorted(suites) == files


SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
print("naïve output, not bytes", flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" not in status.read_text()


def test_an_overrunning_part_is_killed_with_its_whole_process_group(tmp_path, monkeypatch):
    """A part whose process started a child and overruns its budget: both are gone when gpu-check
    moves on, the summary says so, and the log is text."""
    pid_file = tmp_path / "child.pid"
    sleeper = [sys.executable, "-c", SPAWNER, str(pid_file)]
    monkeypatch.setattr(gpu_check, "commands", lambda mode, out: {"env": sleeper})
    monkeypatch.setattr(gpu_check, "BUDGETS", {"env": {"smoke": (1, 4)}})
    monkeypatch.setenv("GPU_CHECK_SMOKE", "1")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    start = time.perf_counter()
    assert gpu_check.main([]) == 1
    assert time.perf_counter() - start < 30
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the part's child outlived its budget"
    record = json.loads((tmp_path / "out" / "summary.json").read_text())["parts"][-1]
    assert record["part"] == "env" and record["status"] == "FAIL (killed at its time budget)"
    log = (tmp_path / "out" / "env.log").read_text()
    assert "naïve output, not bytes" in log and "killed with its process group at its 4 s budget" in log


def _junit(tmp_path, body: str) -> Path:
    """A pytest run of `body` (test functions) in its own folder; returns its JUnit XML."""
    folder = tmp_path / "suite"
    folder.mkdir()
    (folder / "test_suite.py").write_text("import pytest\n\n" + body)
    xml = folder / "suite.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(folder)], capture_output=True, cwd=folder, timeout=120)
    return xml


def test_a_required_test_that_skips_fails_the_suite(tmp_path):
    xml = _junit(tmp_path, """
def test_ok():
    pass

def test_nf4():
    pytest.importorskip("no_such_package_here", reason="the NF4 tensor is torchao's")

def test_two():
    pytest.skip("needs two GPUs")

@pytest.mark.xfail(reason="label rows read on the host")
def test_known():
    assert False
""")
    verdict = suite_verdict(xml, 0)
    assert verdict.startswith("FAIL (1 passed, 2 skipped, 1 xfailed; required tests did not run: ")
    assert "test_suite::test_nf4 skipped: the NF4 tensor is torchao's" in verdict
    assert "test_two" not in verdict


def test_allowed_skips_pass_and_are_named(tmp_path):
    xml = _junit(tmp_path, """
def test_ok():
    pass

def test_two():
    pytest.skip("needs two GPUs")
""")
    assert suite_verdict(xml, 0) == ("PASS (1 passed, 1 skipped; skips allowed: needs two GPUs "
                                     "(a one-GPU machine cannot run it))")
    assert suite_verdict(tmp_path / "missing.xml", 4).startswith("FAIL (exit 4, no JUnit report")


def test_smoke_mode_reports_a_suite_without_cuda_as_skipped(tmp_path):
    xml = _junit(tmp_path, """
@pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
def test_gpu():
    pass
""")
    assert suite_verdict(xml, 0, smoke=True) == "SKIP (no CUDA: 1 tests collected, all need a GPU)"
    assert suite_verdict(xml, 0).startswith("FAIL (1 skipped; required tests did not run: ")


def test_missing_optional_packages_install_from_carried_wheels(tmp_path, monkeypatch):
    """No network on a GPU machine: a package the GPU Python lacks is installed from the first wheel
    folder holding it (GPU_WHEELS, os.pathsep-separated) into the output folder and put on the parts'
    PYTHONPATH; one without a wheel is reported (its tests then fail). Uses the real Liger-Kernel
    wheel of ../shared/gpu/wheels."""
    import importlib.util

    wheels = ROOT.parent / "shared" / "gpu" / "wheels"
    if not any(wheels.glob("liger_kernel-*.whl")):
        pytest.skip(f"no Liger-Kernel wheel in {wheels}")
    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger_kernel is installed here: nothing to install")
    monkeypatch.delenv("LIGER_WHEELS", raising=False)
    assert gpu_check.wheel_folders()[0] == ROOT / ".gpu-wheels"
    monkeypatch.setenv("GPU_WHEELS", os.pathsep.join([str(tmp_path / "empty"), str(wheels)]))
    env = {"PYTHONPATH": "elsewhere"}
    assert gpu_check.ensure_wheel("liger_kernel", env, tmp_path).startswith("installed from ")
    assert (tmp_path / "site" / "liger_kernel").is_dir()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "site"), "elsewhere"]
    assert gpu_check.ensure_wheel("no_such_package", env, tmp_path).startswith("not installed, no wheel in")


DOC = ROOT / "docs" / "gpu-check.md"


def test_the_docs_commands_are_the_ones_tested_here():
    """docs/gpu-check.md's commands, each executed by a test in this file: gpu-wheels and the plans
    below, gpu-check (full and quick) without CUDA below, the smoke mode above."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)
    assert [line for block in blocks for line in block.strip().splitlines()] == [
        "make gpu-wheels", "make gpu-check", "make gpu-check GPU_CHECK_QUICK=1",
        "python -m packtune.bench.gpu_check --plan", "python -m packtune.bench.gpu_check --plan --quick",
        "GPU_CHECK_SMOKE=1 make gpu-check"]


def test_the_docs_budget_table_is_the_plan_the_check_prints():
    rows = re.findall(r"^\| (\w+) \| ([\d-]+) \| ([\d-]+) \| ([\d-]+) \| ([\d-]+) \|$", DOC.read_text(), re.M)
    assert [r[0] for r in rows] == list(gpu_check.BUDGETS)
    for name, *numbers in rows:
        pairs = zip(numbers[::2], numbers[1::2], strict=True)
        for mode, (estimate, budget) in zip(("full", "quick"), pairs, strict=True):
            expected = gpu_check.BUDGETS[name][mode]
            assert (None if estimate == "-" else (int(estimate), int(budget))) == expected, (name, mode)
    for flags, sums in (([], "budgets 505 s + margin 35 s = 540 s <= total 540 s"),
                        (["--quick"], "budgets 255 s + margin 35 s = 290 s <= total 290 s")):
        plan = subprocess.run([sys.executable, "-P", "-m", "packtune.bench.gpu_check", "--plan", *flags],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert plan.returncode == 0 and sums in plan.stdout, plan.stdout + plan.stderr
    text = DOC.read_text()
    assert "add up to 505 s; with a 35 s margin" in text and "255 s\nof budgets and a 35 s margin" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("quick", [False, True])
def test_make_gpu_check_without_cuda_stops_with_one_line(quick):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_SMOKE"}
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}",
                           *(["GPU_CHECK_QUICK=1"] if quick else [])], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "gpu-check: no CUDA device here; GPU_CHECK_SMOKE=1 runs the smoke mode on the CPU" in proc.stderr


def test_make_gpu_wheels_downloads_wheels_for_the_gpu_python(tmp_path):
    """The recipe of `make gpu-wheels` (here with one small wheel into a temporary folder)."""
    proc = subprocess.run(["make", "-s", "gpu-wheels", f"PYTHON={sys.executable}",
                           f"GPU_WHEELS_DIR={tmp_path}", "GPU_WHEEL_SPECS=liger-kernel==0.8.5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("Could not find" in proc.stderr or "NewConnectionError" in proc.stderr
                                 or "No matching distribution" in proc.stderr):
        pytest.skip(f"no package index reachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["liger_kernel-0.8.5-py3-none-any.whl"]
