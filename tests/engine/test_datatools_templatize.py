"""`packtune data templatize`: the shipped specs give the expected rows; templates drawn by seed,
few-shot exemplars never the example itself, caps, weights, inversion, dedup; bad specs and rows
are one-line errors naming the file."""

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from packtune.cli import main
from packtune.config import DataConfig
from packtune.data import prepare_dataset
from packtune.datatools.templatize import templatize
from packtune.datatools.templatize_spec import load_spec
from packtune.demo.mix import make_split

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "templatize"


def _rows(name, seed=None):
    return templatize(load_spec(EXAMPLES / f"{name}.toml"), seed)


def _source(name):
    path = EXAMPLES / name
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _split(row):
    """(the exemplars' text, the example's own prompt) of an Alpaca row."""
    if row["shots"] == 0:
        return "", row["instruction"] + "\n\n" + row["input"]
    head, last = row["instruction"].rsplit("\nAnswer: ", 1)
    answer, own = last.split("\n\n", 1)
    return head + "\nAnswer: " + answer, own + "\n\n" + row["input"]


def test_classification_spec_verbalises_lists_options_and_inverts():
    rows, report = _rows("sentiment")
    source = _source("reviews.csv")
    task = report["tasks"]["sentiment"]
    assert task["source_rows"] == len(source) == 12
    assert task["dropped"] == {"unknown_label": 1}  # the "unsure" row
    assert len(rows) == task["rows"] == 11
    verbaliser = {"pos": "positive", "neg": "negative"}
    label_of = {r["text"]: verbaliser[r["label"]] for r in source if r["label"] != "unsure"}
    for row in rows:
        assert row["task"] == "sentiment"
        assert set(row) >= {"instruction", "input", "output", "template", "shots"}
        if row["template"] == "sentiment/3":  # input inversion: asked for a review of a label
            assert row["output"] in label_of and "options" not in row
            assert row["instruction"].endswith(f"Write a short {label_of[row['output']]} review.")
        else:
            assert row["output"] in ("positive", "negative") and row["options"] == ["positive", "negative"]
            assert "OPTIONS:\n- positive\n- negative" in row["instruction"] + row["input"]
            review = next(t for t in label_of if t in _split(row)[1])
            assert row["output"] == label_of[review]
    assert sum(task["templates"].values()) == 11
    drawn = {t for seed in range(4) for t in _rows("sentiment", seed)[1]["tasks"]["sentiment"]["templates"]}
    assert drawn == {f"sentiment/{i}" for i in range(4)}
    assert set(task["shots"]) == {"0", "2"}


def test_same_seed_same_rows_other_seed_other_template_draws():
    first, _ = _rows("sentiment")
    assert _rows("sentiment")[0] == first
    other, _ = _rows("sentiment", seed=1)
    assert [r["template"] for r in other] != [r["template"] for r in first]


def test_templates_are_drawn_evenly_over_many_examples(tmp_path):
    data = tmp_path / "many.jsonl"
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(600)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = tmp_path / "spec.toml"
    spec.write_text('[[sources]]\nname = "s"\npath = "many.jsonl"\ncolumns = ["q", "a"]\n'
                    '[[tasks]]\nname = "t"\nsource = "s"\nanswer = "{a}"\n'
                    'templates = ["A: {q}", "B: {q}", {instruction = "C", input = "{q}"}]\n')
    rows, report = templatize(load_spec(spec))
    counts = Counter(r["template"] for r in rows)
    assert len(rows) == 600 and set(counts) == {"t/0", "t/1", "t/2"}
    assert all(150 < n < 250 for n in counts.values()), counts


def test_few_shot_exemplars_are_never_the_example_itself():
    rows, report = _rows("nli")
    pairs = _source("pairs.jsonl")
    assert report["tasks"]["nli"]["shots"]["2"] > 0
    hypotheses = [p["hypothesis"].lower().rstrip(".") for p in pairs]
    for row in rows:
        assert row["instruction"].count("\nAnswer: ") == row["shots"]
        exemplars, own = (text.lower() for text in _split(row))
        (mine,) = [h for h in hypotheses if h in own]
        assert mine not in exemplars
        assert sum(h in exemplars for h in hypotheses) == row["shots"]


def test_nli_weight_two_gives_every_pair_twice_and_dedups():
    rows, report = _rows("nli")
    task = report["tasks"]["nli"]
    assert task["source_rows"] == 9
    assert len(rows) + task["dropped"].get("duplicate", 0) == 18
    assert len({json.dumps([r["instruction"], r["input"], r["output"]]) for r in rows}) == len(rows)
    assert {r["output"] for r in rows} == {"yes", "no", "it is not possible to tell"}


def test_extractive_qa_cap_and_messages_rows():
    rows, report = _rows("extractive_qa")
    task = report["tasks"]["extractive_qa"]
    assert len(rows) == 6 and task["dropped"] == {"over_cap": 2}
    source = _source("passages.jsonl")
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        if row["template"] == "extractive_qa/3":
            assert assistant["content"] in {p["question"] for p in source}
        else:
            match = [p for p in source if p["question"] in user["content"].split("\n\n")[-1] + user["content"]
                     and p["answer"] == assistant["content"]]
            assert match, row
    used = {p["id"] for p in source for r in rows if p["question"] in json.dumps(r)}
    assert len(used) <= 8


def test_cli_writes_rows_packtune_train_reads(tmp_path, capsys):
    out = tmp_path / "nli.jsonl"
    assert main(["data", "templatize", str(EXAMPLES / "nli.toml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nli: " in printed and "wrote" in printed
    report = json.loads((tmp_path / "nli.jsonl.report.json").read_text())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["rows"] == len(rows) and report["tasks"]["nli"]["rows"] == len(rows)
    tokenizer = str(_tokenizer(tmp_path, rows))
    cfg = DataConfig(path=str(out), template="alpaca", tokenizer=tokenizer, max_tokens=1024,
                     cache_dir=str(tmp_path / "cache"), num_workers=1)
    assert len(prepare_dataset(cfg)) == len(rows)


def _tokenizer(tmp_path, rows):
    from packtune.demo.tokenizer_training import train_tokenizer

    texts = [r["instruction"] + r["input"] + r["output"] + "### Instruction: Response Input" for r in rows]
    return train_tokenizer(texts, tmp_path / "tok.model", 500, model_type="bpe")


SOURCE = '[[sources]]\nname = "s"\npath = "d.jsonl"\ncolumns = ["q", "a"]\n'
TASK = '[[tasks]]\nname = "t"\nsource = "s"\n'


@pytest.mark.parametrize("spec,message", [
    (SOURCE + TASK + 'answer = "{a}"\ntemplats = ["{q}"]\n',
     "unknown key 'templats'; did you mean 'templates'?"),
    (SOURCE + TASK + 'answer = "{a}"\ntemplates = ["{qq}"]\n',
     "{qq} in '{qq}' is not a column; did you mean 'q'?"),
    (SOURCE + TASK + 'answer = "{a.__class__}"\ntemplates = ["{q}"]\n',
     "a format template names a plain column"),
    (SOURCE + TASK.replace('"s"\n', '"ss"\n') + 'answer = "{a}"\ntemplates = ["{q}"]\n',
     "source 'ss' is not a [[sources]] name; did you mean 's'?"),
    (SOURCE + TASK + 'answer = "{a}"\ntemplates = [{instruction = "{q}", inverted = true}]\n',
     "an inverted template needs its own answer"),
    (SOURCE + TASK + 'engine = "jinja"\nanswer = "{{ a }"\ntemplates = ["{{ q }}"]\n',
     "Jinja syntax error"),
    (SOURCE + TASK + 'engine = "jinja"\nanswer = "{{ a }}"\ntemplates = ["{{ qq }}"]\n',
     "'qq' is undefined in '{{ qq }}'; did you mean 'q'?"),
    (SOURCE + TASK + 'engine = "jinja"\nanswer = "{{ a.__class__.__mro__ }}"\ntemplates = ["{{ q }}"]\n',
     "unsafe"),
    (SOURCE + TASK + 'answer = "{a}"\ntemplates = ["{q}"]\nshots = "two"\n', "shots = 'two'"),
    ('seed = 0\nseed = 1\n', "invalid TOML"),
    (SOURCE.replace('"a"]', '"x"]') + TASK + 'answer = "{x}"\ntemplates = ["{q}"]\n',
     "d.jsonl:2: no column 'x'"),
    (SOURCE.replace("d.jsonl", "bad.jsonl") + TASK + 'answer = "{a}"\ntemplates = ["{q}"]\n',
     "bad.jsonl:2: malformed JSON"),
])
def test_bad_specs_and_rows_are_one_line_errors(tmp_path, capsys, spec, message):
    (tmp_path / "d.jsonl").write_text('{"q": "x?", "a": "y", "x": "z"}\n{"q": "w?", "a": "v"}\n')
    (tmp_path / "bad.jsonl").write_text('{"q": "x?", "a": "y"}\n{"q": \n')
    (tmp_path / "spec.toml").write_text(spec)
    assert main(["data", "templatize", str(tmp_path / "spec.toml"), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_the_demo_mix_is_rendered_by_templatize_and_unchanged():
    """The demo's rows go through templatize's templates and draws, and are the rows it made before
    (digests taken from the demo's own renderer, which this replaced)."""
    expected = {"train": "4fc785a31a4ddeda210f1c8a27c9e333d8a33293",
                "heldout": "cf3ff602b1b45d920c084cfea9089c500e75f022",
                "heldout_phrasing": "925b1ed4cd11c62179c7865145a5bc68b013510a"}
    for split, digest in expected.items():
        rows = make_split(split, 60, seed=3, task_weights={"add": 1.5} if split == "train" else None)
        assert hashlib.sha1(json.dumps(rows).encode()).hexdigest() == digest, split


def test_a_parquet_source(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    table = pa.table({"q": ["Is ice cold?", "Is fire cold?"], "label": [1, 0]})
    pq.write_table(table, tmp_path / "d.parquet")
    (tmp_path / "spec.toml").write_text(
        '[[sources]]\nname = "s"\npath = "d.parquet"\ncolumns = ["q", "label"]\n'
        '[[tasks]]\nname = "t"\nsource = "s"\nlabel_column = "label"\nlabels = {"0" = "no", "1" = "yes"}\n'
        'options = true\nanswer = "{label}"\ntemplates = ["{q}"]\n')
    rows, _ = templatize(load_spec(tmp_path / "spec.toml"))
    assert sorted((r["instruction"], r["output"]) for r in rows) == [
        ("Is fire cold?\n\nOPTIONS:\n- no\n- yes", "no"), ("Is ice cold?\n\nOPTIONS:\n- no\n- yes", "yes")]
