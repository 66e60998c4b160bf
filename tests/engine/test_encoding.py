import numpy as np
import pytest
from data_fixtures import trained_tokenizers

from packtune.data.chat_format import make_chat_format
from packtune.data.formats import Conversation, Message
from packtune.data.tokenizer import load_tokenizer
from packtune.errors import DataError

CONV = Conversation(
    (
        Message("system", "Be brief."),
        Message("user", "What is the sum?"),
        Message("assistant", "The answer is 42."),
        Message("user", "Now sort them\n- b\n- a"),
        Message("assistant", "- a\n- b"),
    )
)


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    return trained_tokenizers(tmp_path_factory)


@pytest.fixture(scope="module")
def sp_model(tokenizers_dir):
    return tokenizers_dir["sp"]


def runs(mask):
    """(start, end) of each maximal run of True."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    return list(zip(edges[::2], edges[1::2], strict=False))


def encode(tok, template, conv=CONV, train_on="assistant"):
    fmt = make_chat_format(template, tok.path, tok, train_on)
    (rendered,) = fmt.render(conv, "f:1")
    (result,) = fmt.encoder.encode_samples([rendered], ["f:1"])
    if isinstance(result, DataError):
        raise result
    return rendered, (np.array(result.ids), np.array(result.mask))


@pytest.mark.parametrize("template", ["chatml", "alpaca", "vicuna_v1.1", "llama2", "llama3", "raw"])
def test_mask_covers_exactly_the_answers_and_their_end_token(sp_model, template):
    tok = load_tokenizer(sp_model)
    segs, (ids, mask) = encode(tok, template)
    end = {"chatml": "<|im_end|>"}.get(template)
    # Two trained runs (one per answer); each is the answer's tokens followed by the end-of-turn token.
    spans = runs(mask)
    assert len(spans) == 2
    for (lo, hi), answer in zip(spans, ["The answer is 42.", "- a\n- b"], strict=False):
        decoded = tok.decode_batch([ids[lo:hi].tolist()])[0]
        if end:
            assert ids[hi - 1] == tok.token_id(end) and decoded.strip().endswith(end)
        elif template != "llama3":
            assert ids[hi - 1] == tok.eos_id
        assert answer in decoded
    # Untrained tokens are exactly the prompt: decoding everything gives the rendered text.
    full = tok.decode_batch([ids.tolist()])[0]
    if template != "chatml":
        assert full == segs.text.replace(tok.bos, "").replace(tok.eos, "")
    assert mask.sum() == sum(hi - lo for lo, hi in spans)


def test_train_on_last_and_all(sp_model):
    tok = load_tokenizer(sp_model)
    _, (ids, mask_default) = encode(tok, "chatml")
    _, (ids_last, mask_last) = encode(tok, "chatml", train_on="last")
    _, (ids_all, mask_all) = encode(tok, "chatml", train_on="all")
    assert np.array_equal(ids, ids_last)
    assert len(runs(mask_last)) == 1 and runs(mask_last)[0] == runs(mask_default)[1]
    assert mask_all.all()


def test_segmentwise_ids_match_whole_text_tokenization_for_plain_text(sp_model):
    tok = load_tokenizer(sp_model)
    conv = Conversation((Message("user", "Count the words"), Message("assistant", " in this sentence")))
    _, (ids, mask) = encode(tok, "raw", conv)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    whole = tok.encode_text("Count the words in this sentence")
    assert tok.decode_batch([ids[1:-1].tolist()])[0] == tok.decode_batch([whole])[0]


def test_hf_tokenizer_json(tokenizers_dir):
    if "hf" not in tokenizers_dir:
        pytest.skip("the optional `tokenizers` package is not installed")
    tok = load_tokenizer(tokenizers_dir["hf"].parent)
    assert tok.bos_id == tok.token_id("<|begin_of_text|>") and tok.eos_id == tok.token_id("<|end_of_text|>")
    segs, (ids, mask) = encode(tok, "llama3")
    eot = tok.token_id("<|eot_id|>")
    assert ids[0] == tok.bos_id
    spans = runs(mask)
    assert len(spans) == 2 and all(ids[hi - 1] == eot for _, hi in spans)
    assert tok.decode_batch([ids.tolist()])[0] == segs.text


def test_text_that_does_not_round_trip_fails_loudly(tokenizers_dir):
    tok = load_tokenizer(tokenizers_dir["sp_lossy"])
    conv = Conversation((Message("user", "line one\n\nline two"), Message("assistant", "ok")))
    with pytest.raises(
        DataError, match=r"f:1: the text 'line one\\n\\nline two.*' cannot be encoded exactly .* "
        r"normalizer rewrites it \(at character 8\)"
    ):
        encode(tok, "raw", conv)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match=f"tokenizer file {tmp_path}/nope.model does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(DataError, match="holds none of tokenizer.model, spiece.model, tokenizer.json"):
        load_tokenizer(tmp_path)
