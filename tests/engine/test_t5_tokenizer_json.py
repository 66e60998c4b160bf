"""A T5 model directory with only a `tokenizer.json` (the form FLAN-T5 checkpoints ship beside, or
instead of, `spiece.model`): packtune's (input, target) pairs are the ids transformers' own T5 tokenizer
gives each side (its post-processor appends `</s>`), the same ids as from the sentencepiece model.

The tokenizer.json is written by transformers from a T5-style unigram sentencepiece model (pad 0,
EOS 1, unk 2, no BOS, 100 `<extra_id_N>` sentinels), the way `convert_slow_tokenizer` made the Hub's."""

import pytest
from data_fixtures import alpaca_rows, corpus, write_jsonl

from packtune.config import DataConfig
from packtune.data import prepare_dataset
from packtune.data.pairs import pair_lengths
from packtune.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def t5_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5_tokenizer_json")
    text = root / "corpus.txt"
    text.write_text("\n".join(corpus(2000)), encoding="utf-8")
    sp_dir, json_dir = root / "spiece", root / "json"
    sp_dir.mkdir()
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(sp_dir / "spiece"), vocab_size=500,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    hf = transformers.T5Tokenizer.from_pretrained(sp_dir)  # 100 sentinels, as T5's
    hf.save_pretrained(json_dir)
    (json_dir / "spiece.model").unlink(missing_ok=True)
    assert (json_dir / "tokenizer.json").is_file()
    return {"spiece": sp_dir, "json": json_dir, "hf": hf}


def pairs(directory, rows, tmp_path):
    config = DataConfig(path=str(rows), tokenizer=str(directory), max_tokens=512, num_workers=1,
                        cache_dir=str(tmp_path / directory.name))
    dataset = prepare_dataset(config, pairs=True)
    inputs, _ = pair_lengths(dataset)
    starts = [0, *dataset.lengths.cumsum()[:-1].tolist()]
    return [(dataset.tokens[s:s + i].tolist(), dataset.tokens[s + i:s + n].tolist())
            for s, i, n in zip(starts, inputs.tolist(), dataset.lengths.tolist(), strict=True)]


def test_tokenizer_json_pairs_are_transformers_t5_ids(t5_tokenizers, tmp_path):
    records = alpaca_rows(30, seed=3, max_words=12)
    rows = write_jsonl(tmp_path / "rows.jsonl", records)
    tok = load_tokenizer(t5_tokenizers["json"])
    assert (tok.eos_id, tok.bos_id) == (1, None)
    from_json = pairs(t5_tokenizers["json"], rows, tmp_path)
    hf = t5_tokenizers["hf"]
    assert len(from_json) == len(records)
    for (source, target), record in zip(from_json, records, strict=True):
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        assert source == hf(prompt).input_ids and source[-1] == 1
        assert target == hf(record["output"]).input_ids
    assert from_json == pairs(t5_tokenizers["spiece"], rows, tmp_path)


def test_special_tokens_written_in_a_record_stay_text(t5_tokenizers, tmp_path):
    """Data is data: `<extra_id_0>` and `</s>` in a record are their characters, not T5's sentinel and
    EOS, though the Unigram model holds both as pieces (transformers' own T5 tokenizer reads them as
    the tokens); decoding and the special tokens' ids are unchanged."""
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "fill <extra_id_0> in </s> then",
                                                  "input": "", "output": "done"}])
    ((source, _),) = pairs(t5_tokenizers["json"], rows, tmp_path)
    hf = t5_tokenizers["hf"]
    sentinel = hf.convert_tokens_to_ids("<extra_id_0>")
    assert {sentinel, 1} <= set(hf("fill <extra_id_0> in </s> then").input_ids[:-1])  # what we avoid
    assert sentinel not in source and source.count(1) == 1 and source[-1] == 1
    tok = load_tokenizer(t5_tokenizers["json"])
    assert (tok.token_id("</s>"), tok.token_id("<extra_id_0>")) == (1, sentinel)
    assert tok.decode_batch([[sentinel, 1]]) == ["<extra_id_0></s>"]
    assert tok.vocab_size == len(hf)
