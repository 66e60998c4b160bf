"""docs/moe.md: its `[train]` TOML block is a valid config with the values it describes, and its bench
command is `packtune bench e2e`'s (tests/test_bench_e2e.py runs the same sides on the moe model at a
tiny size; the table's own run takes half an hour on two cores)."""

import re
import shlex
from pathlib import Path

from packtune.bench import e2e
from packtune.config.toml import load_config

DOC = (Path(__file__).resolve().parents[1] / "docs" / "moe.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.S)


def test_the_toml_block_is_a_valid_config(tmp_path):
    (toml,) = blocks("toml")
    path = tmp_path / "moe.toml"
    path.write_text(toml)
    cfg = load_config(path)
    cfg.train.check()
    assert cfg.train.router_aux_loss is True and cfg.train.router_z_loss == 0.0


def test_the_bench_command_parses():
    (command,) = [line for block in blocks("bash") for line in block.splitlines() if line.strip()]
    words = shlex.split(command)
    assert words[:3] == ["packtune", "bench", "e2e"]
    args = e2e.build_parser().parse_args(words[3:])
    assert args.model == ["moe"]
    assert set(args.impl) == {"packtune", "trl-packing", "packtune-lora", "trl-lora"}
