"""Preference records in TRL's four layouts (packtune.preference.records, .data): one pair of
samples that share exactly the prompt's ids and train only on their responses, the same ids from a
layout and its implicit-prompt form and from JSONL and Parquet; bad records stop with the file and
line, or are counted and skipped with skip_bad_records."""

import pytest
from data_fixtures import trained_tokenizers, write_jsonl

from packtune.config import DataConfig
from packtune.data import prepare_dataset
from packtune.errors import DataError

USER, HI, AWAY = ({"role": r, "content": c} for r, c in
                  (("user", "say hi"), ("assistant", "hi there"), ("assistant", "go away")))
RECORDS = {
    "standard": {"prompt": "say hi", "chosen": " hi there", "rejected": " go away"},
    "standard_implicit": {"chosen": "say hi hi there", "rejected": "say hi go away"},
    "conversational": {"prompt": [USER], "chosen": [HI], "rejected": [AWAY]},
    "conversational_implicit": {"chosen": [USER, HI], "rejected": [USER, AWAY]},
}


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return trained_tokenizers(tmp_path_factory)["sp"]


def tokenize(sp, path, template="alpaca", **options):
    cfg = DataConfig(path=str(path), template=template, tokenizer=str(sp), num_workers=1, max_tokens=200,
                     **options)
    return prepare_dataset(cfg, use_cache=False)


def pair(dataset, i=0):
    """(prompt length, (chosen ids, chosen mask), (rejected ids, rejected mask)) as lists."""
    sides = [tuple(a.tolist() for a in dataset.sample(2 * i + k)) for k in range(2)]
    return int(dataset.prompt_lengths[i]), *sides


@pytest.mark.parametrize("template", ["alpaca", "raw"])
def test_each_layout_gives_one_pair_sharing_the_prompt_ids(sp, tmp_path, template):
    pairs = {name: pair(tokenize(sp, write_jsonl(tmp_path / f"{name}.jsonl", [r]), template))
             for name, r in RECORDS.items()}
    for n, (chosen, chosen_mask), (rejected, rejected_mask) in pairs.values():
        assert chosen[:n] == rejected[:n] and chosen[n:] != rejected[n:]
        assert not any(chosen_mask[:n]) and all(chosen_mask[n:]) and all(rejected_mask[n:])
    assert pairs["standard"] == pairs["standard_implicit"]
    assert pairs["conversational"] == pairs["conversational_implicit"]


def test_parquet_pairs_equal_jsonl_pairs(sp, tmp_path):
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    other = {**RECORDS["conversational"], "rejected": [{"role": "assistant", "content": "no"}]}
    rows = [RECORDS["conversational"], other]
    parquet.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    from_parquet = tokenize(sp, tmp_path / "pairs.parquet")
    from_jsonl = tokenize(sp, write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert [pair(from_parquet, i) for i in range(2)] == [pair(from_jsonl, i) for i in range(2)]


BAD = [
    ({"prompt": "a", "chosen": " x", "rejected": " x"}, "2: chosen and rejected are the same response",
     "identical_responses"),
    ({"prompt": "a", "chosen": " x"}, "2: missing field 'rejected'", "missing_field"),
    ({"prompt": "a", "chosen": 3, "rejected": " y"},
     "2: field 'chosen': expected a string or a list of turns", "wrong_type"),
    ({"prompt": [USER], "chosen": [HI], "rejected": [HI, USER]},
     "2: the rejected response must start and end with an assistant turn", "bad_turn_order"),
]


@pytest.mark.parametrize(("record", "message", "reason"), BAD, ids=[b[2] for b in BAD])
def test_a_bad_record_names_its_file_and_line_or_is_skipped(sp, tmp_path, record, message, reason):
    path = write_jsonl(tmp_path / "pairs.jsonl", [RECORDS["standard"], record, RECORDS["standard"]])
    with pytest.raises(DataError, match=f"pairs.jsonl:{message}"):
        tokenize(sp, path)
    skipped = tokenize(sp, path, skip_bad_records=True)
    assert dict(skipped.report["dropped"]) == {reason: 1} and len(skipped.prompt_lengths) == 2
