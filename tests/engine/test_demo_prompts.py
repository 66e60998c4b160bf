"""Generation prompts are the training samples' prompts, token for token; the TRL baseline of
`bench e2e` sees the same text as packtune's alpaca template."""

import pytest
import sentencepiece as spm

from packtune.bench.e2e_common import alpaca_prompt
from packtune.config import DataConfig
from packtune.data import prepare_dataset
from packtune.data.builtin_templates import get_template, render, render_text
from packtune.data.formats import Conversation, Message
from packtune.data.prompt import PromptEncoder
from packtune.demo.mix import make_split, write_jsonl
from packtune.demo.prompts import rendered_texts
from packtune.demo.recipe import write_template
from packtune.demo.tokenizer_training import train_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompts")
    rows = make_split("train", 30, seed=1)
    template = str(write_template(tmp / "template.toml"))
    tokenizer = train_tokenizer(rendered_texts(rows, template), tmp / "tok.model", 500, model_type="bpe")
    return tmp, rows, template, tokenizer


def test_prompt_ids_are_the_training_samples_prompt_tokens(setup):
    tmp, rows, template, tokenizer = setup
    data = write_jsonl(rows, tmp / "train.jsonl")
    cfg = DataConfig(path=str(data), format="alpaca", template=template, tokenizer=str(tokenizer),
                     max_tokens=256, cache_dir=str(tmp / "cache"), num_workers=1)
    dataset = prepare_dataset(cfg)
    assert len(dataset) == len(rows)
    prompts = PromptEncoder(tokenizer, template)
    encoded = prompts.encode([[Message("user", row["instruction"], row.get("input", ""))] for row in rows])
    for i, row in enumerate(rows):
        ids, mask = dataset.sample(i)
        first_answer = int(mask.argmax())
        assert encoded[i] == ids[:first_answer].tolist()
        answer = ids[first_answer:].tolist()
        assert answer[-1] == prompts.tokenizer.eos_id
        assert prompts.decode(answer) == row["output"]


def test_rendered_texts_hold_the_template_and_the_answer(setup):
    _, rows, template, _ = setup
    text = rendered_texts(rows[:1], template)[0]
    assert text.startswith("### Instruction: " + rows[0]["instruction"])
    assert text.endswith("### Response: " + rows[0]["output"])


def test_every_letter_and_digit_is_one_token_wherever_it_stands(setup):
    """The first letter of an input or an answer is the same token as the others ("▁k"), and a
    newline never merges with a neighbour: what lets the demo model copy letters."""
    _, _, template, tokenizer = setup
    rows = [{"instruction": "Reverse the order of these letters.", "input": "k t a b", "output": "b a t k"},
            {"instruction": "Reverse: k t a b", "input": "", "output": "b a t k"},
            {"instruction": "Sort: 9 3 8 2", "input": "", "output": "2 3 8 9"}]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    for row, text in zip(rows, rendered_texts(rows, template), strict=True):
        pieces = sp.encode(text, out_type=str)
        for item in set(row["output"].split()):
            piece = "▁" + item if item.isalpha() else item  # digits are split from the space
            assert pieces.count(piece) == 2 * row["output"].split().count(item), (item, pieces)
        assert "\n" in pieces


@pytest.mark.parametrize("row", [{"instruction": "Name it.", "input": "", "output": "A name."},
                                 {"instruction": "Sum these.", "input": "1 2", "output": "3"}])
def test_bench_prompt_matches_the_alpaca_template(row):
    conv = Conversation((Message("user", row["instruction"], row["input"]),
                         Message("assistant", row["output"])))
    text = render_text(render(conv, get_template("alpaca"), "row"), bos="<s>", eos="</s>")
    # TRL gets prompt + " " + output: the space is where sentencepiece puts the word boundary.
    assert text == "<s>" + alpaca_prompt(row) + row["output"] + "</s>"
