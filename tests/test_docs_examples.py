"""Every example in README.md and docs/*.md runs, as a reader would run it.

- ```python blocks: each runs as a script (`runpy`, fresh globals, so a missing import fails as it
  would for a reader) with a fresh folder as its working directory, which holds what the examples
  name: `runs/demo/`, written by `packtune demo --quick` (what `make demo` writes, at toy size);
  `models/Qwen3-0.6B`, a tiny random Qwen3 with a small BPE tokenizer and a ChatML chat template
  standing in for the real one; `data/train.jsonl` (the demo's records); and the repository's
  configs/ and examples/. A block is skipped only when its fence says
  ```python no-run, followed by the reason (none is, today).
- ```toml blocks: a complete run config ([model], [data] and [train]) trains 2 steps through
  `packtune train` in that folder, shortened by --set only (steps, device, row length, workers,
  cache); a fragment (a [lora] table, [[data.sources]]) loads through `load_config`, which checks
  every key and type.
- ```bash lines: full runs are too slow for most (the demo takes 8 minutes, the benchmarks far
  longer, some need 8 GPUs), so each command is checked at the cost of a `--help`: a `packtune` line
  (also under torchrun) goes through packtune's own argument parser, a `packtune bench` subject's
  arguments through that subject's parser (stopped once parsed), a `make` target must exist
  (`make -n`), a `pip install` extra must be declared in pyproject.toml, and a configs/ or examples/
  file it names must exist. Where an existing test runs the command for real, RUN_BY names that
  test, and this file checks that it is still there. Any other command in a bash block fails here
  until it gets a check.
- Links from README.md into docs/ lead to a page and, with an #anchor, to a heading on it (mkdocs
  build --strict, in `make lint`, checks the links between the pages).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import runpy
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from packtune.cli import build_parser, main
from packtune.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands an existing test runs for real: (command words) -> (file, the test or line that runs it).
RUN_BY = {
    ("make", "test"): (".ci/run", "make test"),
    ("make", "lint"): (".ci/run", "make lint"),
    ("make", "gpu-check"): ("tests/test_gpu_check.py",
                            "def test_gpu_check_smoke_mode_runs_every_part_within_its_budget"),
    ("packtune", "demo"): ("tests/engine/test_demo_run.py", "def test_quick_demo_end_to_end"),
    ("packtune", "train"): ("tests/engine/test_train_recipes.py", "def test_recipe_trains_two_steps"),
    ("torchrun", "packtune", "train"): ("tests/engine/test_train_recipes.py", "def test_torchrun_two_ranks"),
    ("packtune", "check"): ("tests/engine/test_check.py", "def test_check_prints_each_comparison_and_passes"),
    ("torchrun", "packtune", "check"): ("tests/engine/test_check.py",
                                        "def test_check_under_torchrun_compares_ranks"),
    ("packtune", "bench", "memory"): ("tests/test_bench_memory.py",
                                      "def test_one_run_prints_the_table_the_ratios_and_the_slope"),
    ("packtune", "prepare"): ("tests/engine/test_dataset.py",
                              "def test_prepare_command_prints_and_writes_the_report"),
    ("packtune", "data", "inspect"): ("tests/engine/test_dataset.py",
                                      "def test_data_inspect_takes_records_and_still_the_old_rows_flag"),
    ("packtune", "generate"): ("tests/engine/test_model_generate.py", "def test_cli_generate"),
    ("packtune", "merge"): ("tests/engine/test_lora_train.py",
                            "def test_lora_run_resumes_identically_and_exports_for_peft"),
    ("packtune", "plot"): ("tests/engine/test_run_visibility.py", "def test_plot_two_runs"),
    ("packtune", "env"): ("tests/test_env.py", "def test_env_command_reports_this_machine"),
    ("packtune", "data", "templatize"): ("tests/engine/test_datatools_templatize.py",
                                         "def test_cli_writes_rows_packtune_train_reads"),
    ("packtune", "data", "self-instruct"): (
        "tests/engine/test_datatools_self_instruct.py",
        "def test_self_instruct_over_http_keeps_n_filters_reports_and_resumes"),
    ("packtune", "eval"): ("tests/engine/test_datatools_eval.py",
                           "def test_eval_scores_equal_the_references_on_its_own_predictions"),
}

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    info: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(language: str) -> list[Block]:
    """The fenced blocks of every page whose info string starts with `language`."""
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            match = re.match(r"^```(\S*)\s*(.*)$", lines[i])
            if match is None:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if match.group(1) == language:
                found.append(Block(page, i + 1, match.group(2).strip(), "\n".join(lines[i + 1 : end]) + "\n"))
            i = end + 1
    return found


def ids(items: list[Block]) -> list[str]:
    return [b.id for b in items]


# --- the folder the examples run in -------------------------------------------------------------


def _tiny_qwen3(folder: Path, corpus: list[str]) -> None:
    """A Qwen3 directory as a reader downloads one, at toy size: config.json, safetensors, a
    byte-level BPE tokenizer.json with ChatML's control tokens, its chat template and end-of-turn ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    eos, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML, "model_max_length": 4096}))
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=eos, pad_token_id=pad)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    generation = {"eos_token_id": [eos, pad], "pad_token_id": pad}
    (folder / "generation_config.json").write_text(json.dumps(generation))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """What the examples name, built once: the quick demo's output, a tiny Qwen3, the data file."""
    root = tmp_path_factory.mktemp("docs_world")
    assert main(["demo", "--quick", "--out", str(root / "runs" / "demo")]) == 0
    (root / "data").mkdir()
    shutil.copy(root / "runs" / "demo" / "data" / "train.jsonl", root / "data" / "train.jsonl")
    records = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    _tiny_qwen3(root / "models" / "Qwen3-0.6B",
                [f"{r['instruction']} {r['input']} {r['output']}" for r in records])
    for name in ("configs", "examples"):
        (root / name).symlink_to(ROOT / name)
    return root


@pytest.fixture
def workdir(world, tmp_path) -> Path:
    """A fresh folder per example, seeing the shared inputs through links."""
    for entry in world.iterdir():
        (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


# --- python -------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", blocks("python"), ids=ids(blocks("python")))
def test_python_example_runs(block, workdir, monkeypatch):
    if block.info.startswith("no-run"):
        reason = block.info.removeprefix("no-run").strip(" :-")
        assert reason, f"{block.id}: a no-run block must say why beside the fence"
        pytest.skip(reason)
    assert block.info == "", f"{block.id}: unknown fence info {block.info!r} (only `no-run REASON`)"
    script = workdir / "example.py"
    script.write_text(block.text, encoding="utf-8")
    monkeypatch.chdir(workdir)
    runpy.run_path(str(script), run_name="__main__")  # fresh globals: a missing import fails here too


# --- toml ---------------------------------------------------------------------------------------


def _is_run_config(text: str) -> bool:
    return {"model", "data", "train"} <= set(tomllib.loads(text))


@pytest.mark.parametrize("block", blocks("toml"), ids=ids(blocks("toml")))
def test_toml_example_is_valid(block, workdir, capsys, monkeypatch):
    path = workdir / "example.toml"
    path.write_text(block.text, encoding="utf-8")
    cfg = load_config(path)  # every key and type checked, as `packtune train` does first
    if not _is_run_config(block.text):
        return
    monkeypatch.chdir(workdir)
    shorter = ["train.max_steps=2", 'train.device="cpu"', "data.max_tokens=256", "data.num_workers=1",
               f'data.cache_dir="{workdir / "cache"}"', "train.save_every=0"]
    code = main(["train", str(path), *[a for s in shorter for a in ("--set", s)]])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    if cfg.lora.rank:
        assert f"lora: rank {cfg.lora.rank}" in printed.out
    if cfg.lora.base_dtype == "nf4":
        assert "(nf4)" in printed.out
    out = workdir / cfg.train.output_dir
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in metrics if '"loss"' in line]
    assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] > 0 for s in steps)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


# --- bash ---------------------------------------------------------------------------------------


def commands() -> list[tuple[str, str]]:
    """(where, command line) for every command of every bash block, continuation lines joined."""
    found = []
    for block in blocks("bash"):
        lines = block.text.splitlines()
        i = 0
        while i < len(lines):
            start, text = i, lines[i]
            while text.rstrip().endswith("\\"):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            if text.strip() and not text.strip().startswith("#"):
                found.append((f"{block.id}+{start + 1}", text.strip()))
            i += 1
    return found


def _words(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] == "time"):
        words = words[1:]  # VAR=value prefixes, `time`
    if words and words[0].endswith("/packtune"):
        words[0] = "packtune"  # .venv/bin/packtune
    return words


class _Parsed(Exception):
    pass


def _parse_bench(subject: str, args: list[str]) -> None:
    """Run the subject's own argument parsing, and stop there."""
    module = importlib.import_module(f"packtune.bench.{subject.replace('-', '_')}")
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        original(self, *a, **k)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        module.main(args)
    except _Parsed:
        return
    except SystemExit as e:
        assert e.code == 0, f"packtune bench {subject}: its parser refused {args}"
        return
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"packtune bench {subject} ran without parsing its arguments")


def _check_packtune(argv: list[str]) -> tuple[str, ...]:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, f"packtune's parser refused {argv}"
        return ("packtune", *argv[:1])
    if args.command == "bench":
        _parse_bench(args.subject, args.bench_args)
        return ("packtune", "bench", args.subject)
    for value in argv:
        if re.match(r"^(configs|examples)/", value):
            assert (ROOT / value).exists(), f"{value} is not in the repository"
    sub = getattr(args, "data_command", None)
    return ("packtune", args.command, *([sub] if sub else []))


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


@pytest.mark.parametrize(("where", "line"), commands(), ids=[w for w, _ in commands()])
def test_shell_command_is_valid(where, line):
    words = _words(line)
    if words[0] == "packtune":
        key = _check_packtune(words[1:])
    elif words[0] == "torchrun":
        at = words.index("-m")
        assert words[at + 1] == "packtune", f"{where}: torchrun runs {words[at + 1]}"
        key = ("torchrun", *_check_packtune(words[at + 2 :]))
    elif words[0] == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        proc = subprocess.run(["make", "-n", *targets], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{where}: {line}\n{proc.stderr}"
        key = ("make", *targets)
    elif words[:2] == ["pip", "install"]:
        for extra in re.findall(r"\[([\w,-]+)\]", line):
            assert set(extra.split(",")) <= _extras(), f"{where}: no such extra {extra!r} in pyproject.toml"
        return
    else:
        raise AssertionError(f"{where}: no check for {line!r}; add one to tests/test_docs_examples.py")
    if key in RUN_BY:
        file, marker = RUN_BY[key]
        assert marker in (ROOT / file).read_text(), f"{where}: {file} no longer has {marker!r}"


def test_run_by_names_only_commands_the_pages_show():
    shown = set()
    for _, line in commands():
        words = _words(line)
        if words[0] == "torchrun":
            words = ["torchrun", *words[words.index("-m") + 1 :]]
        shown.update(tuple(words[:n]) for n in (2, 3))
    assert set(RUN_BY) <= shown, set(RUN_BY) - shown


# --- links --------------------------------------------------------------------------------------


def _anchors(page: Path) -> set[str]:
    """Heading ids as mkdocs' toc extension makes them (lower case, punctuation dropped, dashes)."""
    out = set()
    for heading in re.findall(r"^#+\s+(.*)$", page.read_text(encoding="utf-8"), flags=re.M):
        slug = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        out.add(re.sub(r"[-\s]+", "-", slug))
    return out


def test_readme_links_into_docs_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert links
    for target, anchor in links:
        page = ROOT / target
        assert page.is_file(), f"README links to {target}, which does not exist"
        assert not anchor or anchor in _anchors(page), f"README links to {target}#{anchor}: no such heading"


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        in_nav = re.search(rf":\s*{re.escape(page.name)}\s*$", nav, flags=re.M)
        assert in_nav, f"{page.name} is not in mkdocs.yml's nav"
