"""`packtune bench longest-row`: the search (on a modelled device) and the command on the CPU."""

import json

import pytest

from packtune.bench import longest_row
from packtune.bench.longest_row import BACK_OFF, FILL, OutOfMemory, search

GIB = 2**30


def device(capacity, per_token, base, seconds_per_token=1e-5, oom_above=None):
    """A step whose peak is base + per_token x tokens, out of memory past `oom_above` (default: the
    capacity); it records the rows it was asked for."""
    asked = []

    def step(tokens):
        asked.append(tokens)
        peak = base + per_token * tokens
        if peak > (oom_above or capacity):
            raise OutOfMemory("CUDA out of memory")
        return peak, seconds_per_token * tokens

    return step, asked


def test_the_line_predicts_the_longest_row_and_it_trains():
    step, asked = device(80 * GIB, 64 * 1024, 6 * GIB)
    result = search(step, start=65536, longest=1 << 24, capacity=80 * GIB, sample=4096, time_budget=1e9)
    target = int((FILL * 80 * GIB - 6 * GIB) / (64 * 1024)) // 4096 * 4096
    assert asked == [65536, 131072, target] and result["longest_trained"] == target
    assert result["line"]["bytes_per_token"] == pytest.approx(64 * 1024)
    assert "predicts" in result["stopped"]


def test_out_of_memory_at_the_prediction_backs_off_once():
    step, asked = device(80 * GIB, 64 * 1024, 6 * GIB, oom_above=70 * GIB)
    result = search(step, start=65536, longest=1 << 24, capacity=80 * GIB, sample=4096, time_budget=1e9)
    assert len(asked) == 4 and asked[3] == int(BACK_OFF * asked[2]) // 4096 * 4096
    assert result["longest_trained"] == asked[3] and "ran out of memory" in result["stopped"]
    assert "out of memory" in result["attempts"][2]["error"]


def test_the_first_row_out_of_memory_trains_nothing():
    step, asked = device(1 * GIB, 64 * 1024, 6 * GIB)
    result = search(step, start=65536, longest=1 << 24, capacity=1 * GIB, sample=4096, time_budget=1e9)
    assert asked == [65536] and result["longest_trained"] is None and result["line"] is None


def test_max_and_the_time_budget_stop_the_search():
    step, asked = device(80 * GIB, 64 * 1024, 6 * GIB)
    result = search(step, start=65536, longest=200_000, capacity=80 * GIB, sample=4096, time_budget=1e9)
    assert asked[-1] == 200_000 // 4096 * 4096 and result["stopped"] == "reached --max"
    now = [0.0]

    def slow(tokens):  # 1 ms per token, on a clock that the steps advance
        now[0] += tokens * 1e-3
        return 6 * GIB + 64 * 1024 * tokens, tokens * 1e-3

    result = search(slow, start=65536, longest=1 << 24, capacity=80 * GIB, sample=4096, time_budget=300.0,
                    clock=lambda: now[0])
    assert [a["tokens"] for a in result["attempts"]] == [65536, 131072]
    assert "would not end within the 300 s budget" in result["stopped"]


def test_the_command_on_a_cpu_toy(tmp_path, capsys):
    longest_row.main(["--model", "tiny", "--device", "cpu", "--sample-tokens", "64", "--start", "128",
                      "--max", "512", "--cap-gib", "20", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "longest_row.json").read_text())
    assert [a["tokens"] for a in record["attempts"]] == [128, 256, 512]
    assert record["longest_trained"] == 512 and record["stopped"] == "reached --max"
    assert "longest row trained: 512 tokens (reached --max)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give --cap-gib"):
        longest_row.main(["--model", "tiny", "--device", "cpu"])


def test_a_step_that_fails_otherwise_ends_the_search_and_is_reported():
    step, asked = device(80 * GIB, 64 * 1024, 6 * GIB, oom_above=70 * GIB)
    reported = []

    def broken_after_oom(tokens):
        if any(t > 1_000_000 for t in asked):
            raise RuntimeError("FSDP: unexpected state\nmore")
        return step(tokens)

    result = search(broken_after_oom, start=65536, longest=1 << 24, capacity=80 * GIB, sample=4096,
                    time_budget=1e9, report=reported.append)
    assert reported == result["attempts"] and len(reported) == 4
    assert reported[3]["error"] == "failed: FSDP: unexpected state" and result["stopped"] == "failed"
    assert result["longest_trained"] == 131072
