import json

import pytest

from packtune.data.formats import (
    DEFAULT_FIELDS,
    Conversation,
    Message,
    decode_record,
    detect_format,
    field_names,
    to_conversation,
)
from packtune.data.readers import open_records
from packtune.errors import DataError


def conv(record, fmt, fields=DEFAULT_FIELDS):
    return to_conversation(record, fmt, fields, "f:1")


def test_every_layout_normalises_to_one_conversation_type():
    assert conv(
        {"instruction": "Add", "input": "1 2", "output": "3", "system": "S"}, "alpaca"
    ) == Conversation((Message("system", "S"), Message("user", "Add", "1 2"), Message("assistant", "3")))
    assert conv({"instruction": "Hi", "output": "Yo"}, "alpaca").messages == (
        Message("user", "Hi"),
        Message("assistant", "Yo"),
    )
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    messages = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert conv(sharegpt, "sharegpt") == conv(messages, "messages")
    assert conv({"prompt": "p", "completion": "c"}, "prompt_completion").messages == (
        Message("user", "p"),
        Message("assistant", "c"),
    )
    text = conv({"text": "all of it"}, "text")
    assert text.plain_text and text.messages == (Message("assistant", "all of it"),)


def test_field_map_renames_fields():
    fields = field_names(["instruction=question", "output=answer"])
    record = {"question": "q", "answer": "a"}
    assert detect_format(record, fields, "f:1") == "alpaca"
    assert conv(record, "alpaca", fields).messages[1] == Message("assistant", "a")
    with pytest.raises(DataError, match="unknown field 'instrucion'"):
        field_names(["instrucion=q"])


def test_auto_detection():
    cases = {
        "sharegpt": {"conversations": []},
        "messages": {"messages": []},
        "alpaca": {"instruction": "", "output": ""},
        "prompt_completion": {"prompt": "", "completion": ""},
        "text": {"text": ""},
    }
    for fmt, record in cases.items():
        assert detect_format(record, DEFAULT_FIELDS, "f:1") == fmt
    with pytest.raises(DataError, match=r"f:1: cannot tell the data format from the fields \['question'\]"):
        detect_format({"question": "x"}, DEFAULT_FIELDS, "f:1")


def test_jsonl_and_json_array_files(tmp_path):
    records = [{"text": "a"}, {"text": "b"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    stream = open_records(jsonl)
    read = list(stream.records)
    assert stream.unit == "line" and [n for n, _ in read] == [1, 3]
    assert [decode_record("x", raw) for _, raw in read] == records
    array = tmp_path / "d.json"
    array.write_text(json.dumps(records, indent=2))
    stream = open_records(array)
    assert stream.unit == "item" and [decode_record("x", raw) for _, raw in stream.records] == records
