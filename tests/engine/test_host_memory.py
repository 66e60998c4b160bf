"""`release_freed_tensors`: after it, a freed tensor's pages leave the resident set (glibc); without it,
glibc's dynamic threshold serves the same tensor from the heap, whose freed pages stay resident."""

import json
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
from pathlib import Path
import torch
from packtune.host_memory import release_freed_tensors

def rss():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024

released = release_freed_tensors() if sys.argv[1] == "release" else None
first = torch.ones(8 << 18)  # 8 MiB: mapped on its own (above glibc's initial 128 KiB threshold)
del first                    # ... and freed: glibc's dynamic threshold rises to 8 MiB
before = rss()
second = torch.ones(8 << 18)
del second
print(json.dumps({"released": released, "kept": rss() - before}))
"""


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_tensor_pages_leave_the_resident_set():
    released, plain = run("release"), run("plain")
    assert released["released"] is True
    assert released["kept"] < 2 << 20, released  # unmapped on free
    assert plain["kept"] > 6 << 20, plain  # the heap kept it: what the fix removes


@pytest.mark.parametrize("setting", ["none", "checkpointing"])
def test_a_trainer_on_the_cpu_with_checkpointing_releases_freed_tensors(monkeypatch, tmp_path, setting):
    from packtune import train
    from packtune.bench import memory

    calls = []
    monkeypatch.setattr(train, "release_freed_tensors", lambda: calls.append(True))
    memory.packtune_step("full", setting, memory.packed_samples(16, 8, vocab=64), memory.shape(1, 64), 8,
                         str(tmp_path))
    assert calls == ([True] if setting == "checkpointing" else [])
