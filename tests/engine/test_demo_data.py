"""The demo's generated data: deterministic, answers right, held-out split disjoint, tokenizer sane."""

import json

import pytest
import sentencepiece as spm

from packtune.demo.evaluate import normalise, score
from packtune.demo.mix import is_heldout, make_split, read_jsonl, write_jsonl
from packtune.demo.tasks import TASKS, TASKS_BY_NAME
from packtune.demo.tokenizer_training import train_tokenizer


def _instance(row):
    """The task's input, whether the phrasing put it inline or in the `input` field."""
    if row["input"]:
        return row["input"]
    task = TASKS_BY_NAME[row["task"]]
    for phrasing in task.phrasings:
        head, _, tail = phrasing.partition("{x}")
        if "{x}" in phrasing and row["instruction"].startswith(head) and row["instruction"].endswith(tail):
            return row["instruction"][len(head):len(row["instruction"]) - len(tail)]
    raise AssertionError(f"no phrasing of {row['task']} matches {row['instruction']!r}")


def _solve(task, x):
    """An independent solution of each task, from the input text alone."""
    items = x.split()
    if task == "reverse":
        return " ".join(items[::-1])
    if task == "uppercase":
        return " ".join(c.upper() for c in items)
    if task == "lowercase":
        return " ".join(c.lower() for c in items)
    if task == "sort":
        return " ".join(str(n) for n in sorted(int(i) for i in items))
    if task == "largest":
        return str(max(int(i) for i in items))
    if task == "add":
        a, plus, b = items
        assert plus == "+"
        return str(int(a) + int(b))
    if task == "count":
        letter, word, *rest = items
        assert word == "in"
        return str(rest.count(letter))
    if task == "length":
        return str(len(items))
    raise AssertionError(task)


@pytest.fixture(scope="module")
def splits():
    return {name: make_split(name, 150, seed=3) for name in ("train", "heldout", "heldout_phrasing")}


def test_same_seed_same_rows_other_seed_other_rows(splits):
    assert make_split("train", 150, seed=3) == splits["train"]
    assert make_split("train", 150, seed=4) != splits["train"]


def test_every_answer_is_right(splits):
    for rows in splits.values():
        for row in rows:
            assert row["output"] == _solve(row["task"], _instance(row)), row


def test_heldout_instances_never_appear_in_training(splits):
    train = {(r["task"], _instance(r)) for r in splits["train"]}
    for name in ("heldout", "heldout_phrasing"):
        held = {(r["task"], _instance(r)) for r in splits[name]}
        assert held and not held & train
        assert all(is_heldout(task, x) for task, x in held)
    assert not any(is_heldout(task, x) for task, x in train)


def test_heldout_phrasings_are_unseen_in_training(splits):
    held = {TASKS_BY_NAME[r["task"]].heldout_phrasing for r in splits["heldout_phrasing"]}
    assert len(held) == len(TASKS)
    for row in splits["train"]:
        assert _phrasing(row) in TASKS_BY_NAME[row["task"]].train_phrasings


def _phrasing(row):
    task = TASKS_BY_NAME[row["task"]]
    x = _instance(row)
    return next(p for p in task.phrasings if p.replace("{x}", x) == row["instruction"])


def test_every_task_and_both_alpaca_variants_occur(splits):
    rows = splits["train"]
    assert {r["task"] for r in rows} == set(TASKS_BY_NAME)
    assert len(rows) == 150 * len(TASKS)
    with_input = sum(bool(r["input"]) for r in rows)
    assert 0.2 * len(rows) < with_input < 0.8 * len(rows)


def test_task_weights_and_a_used_up_instance_space():
    """add has about 7,000 training sums: asked for 10,000 rows, the training split repeats
    sums after using them all up; the held-out split (about 1,000 sums) stops short instead."""
    train = [r for r in make_split("train", 100, seed=5, task_weights={"add": 100, "sort": 0.5})
             if r["task"] in ("add", "sort")]
    adds = [_instance(r) for r in train if r["task"] == "add"]
    assert len(adds) == 10_000 and sum(r["task"] == "sort" for r in train) == 50
    assert 6_500 < len(set(adds)) < 7_100
    assert not any(is_heldout("add", x) for x in adds)
    heldout = make_split("heldout", 100, seed=5, task_weights={"add": 20})
    held = [_instance(r) for r in heldout if r["task"] == "add"]
    assert 900 < len(held) == len(set(held)) < 1_100
    with pytest.raises(ValueError, match="unknown tasks"):
        make_split("train", 1, task_weights={"multiply": 2})


def test_jsonl_holds_plain_alpaca_rows(tmp_path, splits):
    path = write_jsonl(splits["heldout"], tmp_path / "d" / "heldout.jsonl")
    rows = read_jsonl(path)
    assert [set(r) for r in rows] == [{"instruction", "input", "output"}] * len(rows)
    assert [r["output"] for r in rows] == [r["output"] for r in splits["heldout"]]
    assert json.loads(path.read_text().splitlines()[0]) == rows[0]


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        make_split("test", 1)


def test_normalise_and_score():
    assert normalise("  4 2 \n") == "4 2"
    assert normalise("42.") == "42"
    assert normalise("A B") != normalise("a b")
    rows = [{"task": "add", "output": "12"}, {"task": "add", "output": "7"},
            {"task": "sort", "output": "1 2"}]
    result = score(rows, [" 12.", "8", "1  2"])
    assert (result.correct, result.total) == (2, 3)
    assert result.task_accuracy() == {"add": 0.5, "sort": 1.0}
    assert result.to_dict()["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 3 records"):
        score(rows, ["1", "2"])


def test_tokenizer_round_trips_and_splits_letters_and_digits(tmp_path, splits):
    texts = [f"{r['instruction']}\n\n{r['input']}\n\n{r['output']}" for r in splits["train"]]
    path = train_tokenizer(texts, tmp_path / "tok.model", vocab_size=600, model_type="bpe")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert 300 < sp.vocab_size() <= 600
    assert [sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()] == [0, 1, 2, 3]
    for text in texts[:50]:
        assert sp.decode(sp.encode(text)) == text
    assert sp.encode("k t a", out_type=str)[-2:] == ["▁t", "▁a"]
    assert sp.encode("907", out_type=str) == ["▁", "9", "0", "7"]
    assert sp.decode(sp.encode("naïve €")) == "naïve €"  # unseen characters fall back to bytes


def test_tokenizer_training_is_deterministic(tmp_path, splits):
    texts = [r["instruction"] + " " + r["output"] for r in splits["train"]]
    a = train_tokenizer(texts, tmp_path / "a.model", vocab_size=500).read_bytes()
    b = train_tokenizer(texts, tmp_path / "b.model", vocab_size=500).read_bytes()
    assert a == b
