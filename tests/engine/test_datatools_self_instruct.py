"""`packtune data self-instruct` against a real OpenAI-compatible server process on 127.0.0.1 (a
deterministic fake: fake_openai_server.py), and end to end with a tiny local model trained here."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from packtune.cli import main
from packtune.datatools.openai_generator import GeneratorError, OpenAIChatGenerator, chat_completions_url
from packtune.datatools.seed_tasks import read_seed_tasks
from packtune.datatools.self_instruct_prompts import parse_instance, parse_proposals

HERE = Path(__file__).resolve().parent
SEEDS = HERE.parents[1] / "examples" / "self_instruct" / "seed_tasks.jsonl"


def _start_server(tmp_path, fail_first=0):
    port_file = tmp_path / f"port-{fail_first}"
    process = subprocess.Popen([sys.executable, str(HERE / "fake_openai_server.py"), str(port_file),
                                str(fail_first)])
    for _ in range(200):
        if port_file.exists():
            log = port_file.with_name(port_file.name + ".log")
            return process, f"http://127.0.0.1:{port_file.read_text()}", log
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the fake server did not start")


@pytest.fixture
def server(tmp_path):
    process, url, log = _start_server(tmp_path)
    yield url, log
    process.kill()
    process.wait()


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_http_generator_talks_to_a_server_process(server, monkeypatch):
    url, log = server
    monkeypatch.setenv("TEST_KEY", "sk-test")
    generator = OpenAIChatGenerator(url + "/v1", "fake-model", api_key_env="TEST_KEY", concurrency=3)
    prompts = ["Can the task be regarded as a classification?\nTask: Classify the fruit.",
               "Can the task be regarded as a classification?\nTask: Write a poem."] * 3
    assert generator.complete(prompts) == ["Yes", "No"] * 3
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 6
    assert {r["auth"] for r in records} == {"Bearer sk-test"}
    assert {r["model"] for r in records} == {"fake-model"}
    expected = "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1") == chat_completions_url("http://h:1/v1/") == expected


def test_http_generator_retries_with_backoff_then_gives_up(tmp_path):
    process, url, log = _start_server(tmp_path, fail_first=2)
    try:
        generator = OpenAIChatGenerator(url, "m", retries=3, backoff=0.01)
        assert generator.complete(["Can the task be regarded\nTask: Classify it."]) == ["Yes"]
        assert len(log.read_text().splitlines()) == 3  # two 503s, then the answer
        with pytest.raises(GeneratorError, match="HTTP 404"):
            OpenAIChatGenerator(url + "/v2", "m").complete(["x"])
    finally:
        process.kill()
        process.wait()
    with pytest.raises(GeneratorError, match="failed 2 times"):
        OpenAIChatGenerator(url, "m", retries=1, backoff=0.01, timeout=2).complete(["x"])


def test_self_instruct_over_http_keeps_n_filters_reports_and_resumes(server, tmp_path, capsys):
    url, log = server
    out = tmp_path / "generated.jsonl"
    args = ["data", "self-instruct", "--seed-tasks", str(SEEDS), "--out", str(out), "--base-url", url,
            "--model", "fake", "--batch-size", "2"]
    assert main([*args, "--num", "5"]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 5 and "stopped: reached --num 5 kept instructions" in printed
    report = json.loads((tmp_path / "generated.jsonl.report.json").read_text())
    run = report["runs"][-1]
    assert report["kept"] == 5 and run["new"] == 5
    for reason in ("unactionable_word", "too_short", "similar", "starts_with_punctuation"):
        assert run["dropped"][reason] >= 1, run
    instructions = [r["instruction"] for r in rows]
    assert len(set(instructions)) == 5
    # The server answers concurrent requests in arrival order, so which of two near-duplicates comes
    # first varies; the ROUGE-L filter must keep exactly one of them.
    near = {"Summarize the story of a famous novel in two sentences.",
            "Summarize the story of a famous novel in three sentences."}
    assert len(near & set(instructions)) == 1
    classify = next(r for r in rows if r["instruction"].startswith("Classify"))
    assert classify["is_classification"] and classify["output"] and classify["input"].startswith("an example")
    other = next(r for r in rows if r["instruction"].startswith("Summarize"))
    assert not other["is_classification"] and other["output"].startswith("an answer to")

    # Resume: the same --out continues to --num 8, never repeating a kept instruction.
    assert main([*args, "--num", "8"]) == 0
    rows = _rows(out)
    assert len(rows) == 8 and len({r["instruction"] for r in rows}) == 8
    assert rows[:5] == [dict(zip(r, r.values(), strict=True)) for r in rows[:5]]
    report = json.loads((tmp_path / "generated.jsonl.report.json").read_text())
    assert [r["new"] for r in report["runs"]] == [5, 3] and report["runs"][-1]["kept_before"] == 5

    # Bounded by requests: nothing more can be had in 3 requests (a proposal round, then no budget).
    assert main([*args, "--num", "20", "--max-requests", "3"]) == 0
    assert "stopped: reached --max-requests 3 generator requests" in capsys.readouterr().out
    assert len(_rows(out)) <= 9


def test_a_line_cut_short_by_a_kill_is_dropped_on_resume(server, tmp_path):
    url, _ = server
    out = tmp_path / "g.jsonl"
    kept = {"instruction": "Translate the sentence into French.", "input": "", "output": "x"}
    out.write_text(json.dumps(kept) + '\n{"instruction": "Expl')
    assert main(["data", "self-instruct", "--seed-tasks", str(SEEDS), "--out", str(out), "--base-url", url,
                 "--model", "fake", "--num", "3"]) == 0
    rows = _rows(out)
    assert len(rows) == 3 and rows[0]["instruction"] == "Translate the sentence into French."
    assert sum(r["instruction"] == "Translate the sentence into French." for r in rows) == 1


def test_bad_seed_tasks_and_unreachable_server_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "seeds.jsonl"
    good = {"instruction": "Do it.", "instances": [{"input": "", "output": "ok"}]}
    bad.write_text(json.dumps(good) + '\n{"instances": []}\n')
    common = ["data", "self-instruct", "--out", str(tmp_path / "o.jsonl"), "--num", "2", "--model", "m"]
    assert main([*common, "--seed-tasks", str(bad), "--base-url", "http://127.0.0.1:9"]) == 2
    assert "seeds.jsonl:2: missing field 'instruction'" in capsys.readouterr().err
    unreachable = ["--base-url", "http://127.0.0.1:9", "--retries", "0"]
    assert main([*common, "--seed-tasks", str(SEEDS), *unreachable]) == 1
    err = capsys.readouterr().err
    assert "the generator failed" in err and "Traceback" not in err


def test_seed_tasks_in_both_formats_and_answer_parsing(tmp_path):
    seeds = read_seed_tasks(SEEDS)
    assert len(seeds) == 8 and sum(s.is_classification for s in seeds) == 3
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "red"}) + "\n")
    assert read_seed_tasks(alpaca)[0].instances == (("", "red"),)
    assert parse_proposals("Write a limerick.\nTask 10: Name a river.\n11. Count to five.\n") == [
        "Write a limerick.", "Name a river.", "Count to five."]
    assert parse_instance(" <noinput>\nOutput: Hello.\n\nTask: next", False) == ("", "Hello.")
    assert parse_instance("Class label: odd\nInput: 7", True) == ("7", "odd")
    assert parse_instance("nothing useful", False) is None


@pytest.mark.slow
def test_self_instruct_with_a_local_model_trained_on_the_seed_tasks(tmp_path, capsys):
    """A tiny Llama trained for a few steps on the seed tasks generates (junk): the loop still runs,
    filters, reports, and stops at its request budget."""
    import torch

    from packtune.demo.prompts import rendered_texts
    from packtune.demo.recipe import QUICK, write_template
    from packtune.demo.tokenizer_training import train_tokenizer
    from packtune.model.config import ModelArgs
    from packtune.model.hf_io import save_pretrained
    from packtune.model.llama import LlamaForCausalLM
    from packtune.run import run

    seeds = read_seed_tasks(SEEDS)
    rows = [{"instruction": s.instruction, "input": given, "output": output}
            for s in seeds for given, output in s.instances]
    data = tmp_path / "seeds_alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    template = write_template(tmp_path / "template.toml")
    tokenizer = train_tokenizer(rendered_texts(rows, str(template)) + ["Task 1: Come up with a series"],
                                tmp_path / "tok.model", 400, model_type="bpe")
    torch.manual_seed(0)
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    model = LlamaForCausalLM(ModelArgs.from_hf_config(QUICK.hf_config(vocab)))
    model.init_weights(torch.Generator().manual_seed(0))
    init = save_pretrained(model, tmp_path / "init", tokenizer_files=[tokenizer])
    cfg = QUICK.train_config(tmp_path, init, data, tokenizer, template, 0)
    cfg.train.max_steps = 6
    final = run(cfg)
    capsys.readouterr()

    out = tmp_path / "generated.jsonl"
    assert main(["data", "self-instruct", "--seed-tasks", str(SEEDS), "--out", str(out),
                 "--model", str(final), "--template", str(template), "--num", "2", "--max-requests", "6",
                 "--batch-size", "3", "--max-new-tokens", "24", "--temperature", "1.0"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "generated.jsonl.report.json").read_text())
    run = report["runs"][-1]
    assert run["requests"] <= 6 and run["proposed"] + run["dropped"].get("unparsable", 0) >= 3
    assert report["kept"] == (len(_rows(out)) if out.exists() else 0)
    assert "stopped: reached" in printed
    assert run["proposed"] == sum(v for k, v in run["dropped"].items() if k != "unparsable") + run["new"]
    print(json.dumps(report))
