import json
import sys
import types

import torch

from packtune.bench import harness


def test_worker_measures_memory_of_the_step_not_the_inputs(tmp_path, monkeypatch):
    # A factory module the worker subprocess can import: the step allocates ~64 MiB on top of inputs.
    (tmp_path / "fake_bench.py").write_text(
        "import torch\n"
        "def make_step(impl, shape, dtype, device):\n"
        "    x = torch.ones(shape['n'], dtype=getattr(torch, dtype))\n"
        "    return lambda: (x * 2).sum() if impl == 'big' else x.sum()\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    n = 16 * 2**20  # 64 MiB of fp32
    big = harness.run_in_subprocess("fake_bench:make_step", "big", {"n": n}, "float32", "cpu", 1, 3)
    small = harness.run_in_subprocess("fake_bench:make_step", "small", {"n": n}, "float32", "cpu", 1, 3)
    assert 60 * 2**20 < big["peak_bytes"] < 80 * 2**20, big
    assert small["peak_bytes"] < 8 * 2**20, small
    assert big["median_s"] > 0


def test_run_table_writes_json_and_csv(tmp_path, monkeypatch, capsys):
    module = types.ModuleType("fake_table_bench")
    monkeypatch.setitem(sys.modules, "fake_table_bench", module)
    monkeypatch.setattr(harness, "run_in_subprocess",
                        lambda factory, impl, shape, *a: {"median_s": 0.01 if impl == "base" else 0.005,
                                                          "peak_bytes": 2**20})
    args = harness.bench_parser("x", "").parse_args(["--out", str(tmp_path), "--device", "cpu"])
    rows = harness.run_table("x", "fake_table_bench:make_step", ["base", "fast"], [{"n": 4}], "base", args)
    assert [r["speedup_vs_baseline"] for r in rows] == [1.0, 2.0]
    assert json.loads((tmp_path / "x.json").read_text())[1]["implementation"] == "fast"
    assert (tmp_path / "x.csv").read_text().splitlines()[0].startswith("device,")
    assert "2.00x" in capsys.readouterr().out
    assert torch.__version__ in rows[0]["torch"]
