"""`make gpu-check` runs to the end on the CPU in its smoke mode (tiny shapes, the Triton
interpreter, GPU-only parts reported as skipped) and writes everything to one folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_mode_runs_to_the_end(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=230)
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    status = {r["part"]: r["status"] for r in summary["parts"]}
    assert summary["smoke"] is True
    assert status["suite"].startswith("SKIP (no CUDA"), status
    assert status["bench torch.compile, liger"].startswith("SKIP")
    for part in ("env", "bench_ce", "bench_linear_ce", "train", "bench_lora"):
        assert status[part] == "PASS", status
    for name in ("summary.txt", "env.log", "suite.log", "suite.xml", "bench/ce.json", "bench/linear_ce.json",
                 "train/train.json", "train/run/metrics.jsonl"):
        assert (out / name).exists(), name
    assert "SDPA over length buckets" in (out / "env.log").read_text()


def test_missing_optional_packages_install_from_carried_wheels(tmp_path, monkeypatch):
    """No network on a GPU machine: a package the GPU Python lacks is installed from a wheel in
    $GPU_WHEELS into the output folder and put on the parts' PYTHONPATH; one without a wheel is
    reported as skipped. Uses the real Liger-Kernel wheel of ../shared/gpu/wheels."""
    import importlib.util

    import pytest

    from packtune.bench import gpu_check

    wheels = ROOT.parent / "shared" / "gpu" / "wheels"
    if not any(wheels.glob("liger_kernel-*.whl")):
        pytest.skip(f"no Liger-Kernel wheel in {wheels}")
    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger_kernel is installed here: nothing to install")
    monkeypatch.setattr(gpu_check, "GPU_WHEELS", wheels)
    monkeypatch.setattr(gpu_check, "OUT", tmp_path)
    env = {"PYTHONPATH": "elsewhere"}
    assert gpu_check.ensure_wheel("liger_kernel", env).startswith("installed from liger_kernel-")
    assert (tmp_path / "site" / "liger_kernel").is_dir()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "site"), "elsewhere"]
    assert gpu_check.ensure_wheel("no_such_package", env).startswith("not installed, no wheel in")
