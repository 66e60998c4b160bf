"""`packtune train` on real tokenizers (../shared/real) with their own chat template and with the
built-in chatml / llama3 templates: a tiny random Llama of matching vocabulary trains, no row is
dropped, and the data report names the template and the special-token ids it used."""

import json
from pathlib import Path

import pytest
from data_fixtures import random_text, write_jsonl
from real_files import real_path
from toy_training import tiny_llama

from packtune.cli import main
from packtune.data.tokenizer import load_tokenizer
from packtune.model.hf_io import save_pretrained

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


def chat_rows(n: int) -> list[dict]:
    import random

    rng = random.Random(0)
    rows = []
    for k in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if k % 3 == 0 else []
        for _ in range(1 + k % 2):
            messages += [{"role": "user", "content": random_text(rng, rng.randint(2, 8))},
                         {"role": "assistant", "content": random_text(rng, rng.randint(2, 8))}]
        rows.append({"messages": messages})
    rows.append({"messages": [{"role": "user", "content": "Print <|im_end|> and <|eot_id|>"},
                              {"role": "assistant", "content": "<|im_end|> <|eot_id|>"}]})
    return rows


@pytest.mark.parametrize(("name", "template"), [("llama3_1", "auto"), ("llama3_1", "llama3"),
                                                ("qwen3", "auto"), ("qwen3", "chatml"),
                                                ("mistral_v3_sp", "llama2")])
def test_train_two_steps_on_a_real_tokenizer(tmp_path, capsys, name, template):
    folder = real_path("tokenizers", name)
    vocab = load_tokenizer(folder).vocab_size
    model = save_pretrained(tiny_llama(vocab=vocab, tied=True), tmp_path / "model")
    rows = chat_rows(24)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    overrides = [
        f'model.path="{model}"', f'data.path="{data}"', f'data.tokenizer="{folder}"',
        'data.format="messages"',
        f'data.template="{template}"', 'data.rewritten_history="split"', "data.max_tokens=128",
        "data.num_workers=1", f'data.cache_dir="{tmp_path / "cache"}"', 'data.packing_strategy="bfd"',
        f'train.output_dir="{out}"', "train.max_steps=2", 'train.device="cpu"',
    ]
    report_json = tmp_path / "report.json"
    assert main(["prepare", str(CONFIG), *[a for o in overrides for a in ("--set", o)],
                 "--report-json", str(report_json)]) == 0
    report = json.loads(report_json.read_text())
    assert report["dropped"] == {} and report["kept"] >= len(rows)
    assert report["rows_checked_against_reference"] > 0 or name == "mistral_v3_sp"  # no reference for .model
    tok = load_tokenizer(folder)
    assert (report["bos_id"], report["eos_id"]) == (tok.bos_id, tok.eos_id)
    assert main(["train", str(CONFIG), *[a for o in overrides for a in ("--set", o)]]) == 0
    stdout = capsys.readouterr().out
    assert "step 2/2" in stdout and "special tokens: BOS" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(r["loss"] > 0 and r["label_tokens"] > 0 for r in records if "loss" in r)
