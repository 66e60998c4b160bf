import json

import numpy as np

from packtune.bench import pack


def test_reference_packers_and_the_table(tmp_path, capsys):
    lengths = np.array([6, 5, 4, 3, 2, 2, 1, 1])
    assert pack.next_fit(lengths, 8) == 4  # 6 | 5 | 4 3 | 2 2 1 1: only the last row is open
    assert pack.first_fit(lengths, 8) == 3  # 6 2 | 5 3 | 4 2 1 1: the leftmost row that fits
    assert pack.first_fit(np.array([8, 1, 7]), 8) == 2
    pack.main(["--samples", "3000", "--pack-samples", "20000", "--repeats", "1", "--skip-tokenize",
               "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "pack.json").read_text())
    bfd = {r["max_tokens"]: r["value"] for r in rows if r["method"] == "packtune BFD"}
    pad = {r["max_tokens"]: r["value"] for r in rows if r["method"].startswith("pad to longest")}
    shuffle = {r["max_tokens"]: r["value"] for r in rows if r["method"] == "packtune shuffle"}
    assert all(bfd[c] > pad[c] for c in bfd) and bfd[2048] > 0.98
    assert all(bfd[c] >= shuffle[c] > pad[c] for c in bfd) and shuffle[2048] > 0.95
    printed = capsys.readouterr().out
    assert "packtune BFD" in printed and "packtune shuffle (python)" in printed
