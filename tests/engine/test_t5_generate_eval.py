"""`packtune generate` and `packtune eval` on a T5: the prompt becomes the encoder's input as training pairs
render it (data/pairs.py: no BOS, EOS after it), and the answers are transformers' own greedy ones."""

import json
import shutil

import pytest
from data_fixtures import alpaca_rows, trained_tokenizers, write_jsonl
from t5_fixtures import save_hf_t5

from packtune.cli import main
from packtune.data.tokenizer import load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5_generate")
    model = save_hf_t5("t5_v11", root / "model", vocab_size=600)
    shutil.copyfile(trained_tokenizers(tmp_path_factory)["sp"], model / "spiece.model")
    return model


def transformers_answers(model_dir, prompts: list[str], max_new_tokens: int) -> list[str]:
    """transformers' greedy answers to each prompt encoded as packtune encodes an encoder's input."""
    tok = load_tokenizer(model_dir)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        ids = torch.tensor([[*tok.encode_text(prompt), tok.eos_id]])
        # after the start token; use_cache=False as in test_model_t5_generate.py (transformers sizes its
        # decoder cache by the encoder's layers)
        out = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_id,
                          pad_token_id=hf.config.pad_token_id, use_cache=False)[0, 1:].tolist()
        answers.append(tok.decode_batch([[t for t in out if t != tok.eos_id]])[0])
    return answers


def test_generate_answers_as_transformers_does(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "the quick brown", "--max-new-tokens",
                 "7"]) == 0
    assert capsys.readouterr().out == transformers_answers(model_dir, ["the quick brown"], 7)[0] + "\n"


def test_eval_scores_transformers_greedy_answers(model_dir, tmp_path, capsys):
    rows = alpaca_rows(6, max_words=12)
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--max-new-tokens", "6",
                 "--json", str(out)]) == 0
    predictions = json.loads(out.read_text())["predictions"]
    prompts = [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in rows]
    assert [p["prediction"] for p in predictions] == transformers_answers(model_dir, prompts, 6)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("exact match: ")
