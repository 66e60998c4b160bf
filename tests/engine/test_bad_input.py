"""Every kind of bad input: one clear error naming file, line and field, or skipped and counted."""

import json

import pytest
from data_fixtures import trained_tokenizers

from packtune.config import DataConfig
from packtune.data import prepare_dataset
from packtune.errors import ConfigError, DataError

GOOD = json.dumps({"instruction": "Say hi", "output": "hi"}).encode()
SHAREGPT_GOOD = json.dumps(
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
)

# name -> (bad line, expected message after "<file>:2: ", reason counted under skip_bad_records)
CASES = {
    "malformed_json": (
        b'{"instruction": "x", "output": ',
        r"malformed JSON: Expecting value",
        "malformed_json",
    ),
    "wrong_type": (
        b'{"instruction": "x", "output": 3}',
        r"field 'output': expected a string, got a number",
        "wrong_type",
    ),
    "missing_field": (b'{"instruction": "x", "outptu": "y"}', r"missing field 'output'", "missing_field"),
    "empty_response": (
        b'{"instruction": "x", "output": "  "}',
        r"field 'output': empty response",
        "empty_response",
    ),
    "invalid_utf8": (
        b'{"instruction": "caf\xe9", "output": "y"}',
        r"invalid UTF-8 at byte 20",
        "invalid_utf8",
    ),
    "not_an_object": (b'["instruction", "output"]', r"expected a JSON object, got a list", "wrong_type"),
}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return trained_tokenizers(tmp_path_factory)["sp"]


def config(path, sp_model, **kw):
    return DataConfig(path=str(path), tokenizer=str(sp_model), max_tokens=256, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_row_names_file_line_and_field(name, sp_model, tmp_path):
    line, message, reason = CASES[name]
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b"\n" + line + b"\n" + GOOD + b"\n")
    with pytest.raises(DataError, match=f"^{path}:2: {message}"):
        prepare_dataset(config(path, sp_model), num_workers=1, use_cache=False)
    ds = prepare_dataset(config(path, sp_model, skip_bad_records=True), num_workers=1, use_cache=False)
    assert ds.report["rows"] == 3 and ds.report["kept"] == 2 and ds.report["dropped"] == {reason: 1}
    assert ds.report["errors"][0].startswith(f"{path}:2: ")


def test_unknown_role(sp_model, tmp_path):
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f()"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(SHAREGPT_GOOD + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(
        DataError, match=f"^{path}:2: message 1: role 'function_call' is not known to template 'chatml'"
    ):
        prepare_dataset(config(path, sp_model, template="chatml"), num_workers=1, use_cache=False)
    ds = prepare_dataset(
        config(path, sp_model, template="chatml", skip_bad_records=True), num_workers=1, use_cache=False
    )
    assert ds.report["dropped"] == {"unknown_role": 1} and ds.report["kept"] == 1


def test_empty_and_missing_files(sp_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    for skip in (False, True):
        with pytest.raises(DataError, match=f"^{empty}: the file is empty"):
            prepare_dataset(config(empty, sp_model, skip_bad_records=skip), num_workers=1, use_cache=False)
    with pytest.raises(ConfigError, match="data.path: .*nope.jsonl does not exist"):
        prepare_dataset(config(tmp_path / "nope.jsonl", sp_model), num_workers=1, use_cache=False)


def test_missing_tokenizer_and_bad_options(sp_model, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b"\n")
    with pytest.raises(DataError, match=f"tokenizer file {tmp_path}/missing.model does not exist"):
        prepare_dataset(config(path, tmp_path / "missing.model"), num_workers=1, use_cache=False)
    with pytest.raises(ConfigError, match="data.truncation: 'cut' is not one of drop, truncate"):
        prepare_dataset(config(path, sp_model, truncation="cut"), num_workers=1, use_cache=False)
    with pytest.raises(DataError, match="unknown template 'chatlm'"):
        prepare_dataset(config(path, sp_model, template="chatlm"), num_workers=1, use_cache=False)


def test_errors_in_worker_processes_keep_their_location(sp_model, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([GOOD] * 4100 + [b'{"instruction": 1, "output": "y"}']) + b"\n")
    with pytest.raises(DataError, match=f"^{path}:4101: field 'instruction': expected a string"):
        prepare_dataset(config(path, sp_model), num_workers=2, use_cache=False)
