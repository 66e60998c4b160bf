"""`packtune eval` on a tiny model: batched greedy answers in the training template, metrics equal
to the reference implementations on its own predictions, per task, options; and `[train] eval_data`
logging the same metrics to metrics.jsonl during training, its rows shared by 2 gloo ranks."""

import json
import os
from pathlib import Path

import pytest
import torch

from packtune.cli import main
from packtune.datatools.answer_metrics import squad_normalize
from packtune.datatools.templatize import templatize
from packtune.datatools.templatize_spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "templatize"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from packtune.demo.prompts import rendered_texts
    from packtune.demo.recipe import QUICK, write_template
    from packtune.demo.tokenizer_training import train_tokenizer
    from packtune.model.config import ModelArgs
    from packtune.model.hf_io import save_pretrained
    from packtune.model.llama import LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("eval")
    specs = [load_spec(EXAMPLES / f"{name}.toml") for name in ("nli", "sentiment")]
    rows = [row for spec in specs for row in templatize(spec)[0]]
    data = tmp / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = write_template(tmp / "template.toml")
    texts = rendered_texts(rows, str(template))
    tokenizer = train_tokenizer(texts, tmp / "tokenizer.model", 500, model_type="bpe")
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    model = LlamaForCausalLM(ModelArgs.from_hf_config(QUICK.hf_config(vocab)))
    model.init_weights(torch.Generator().manual_seed(0))
    model_dir = save_pretrained(model, tmp / "model", tokenizer_files=[tokenizer])
    return tmp, data, rows, template, tokenizer, model_dir, QUICK


def test_eval_scores_equal_the_references_on_its_own_predictions(setup, capsys):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    tmp, data, rows, template, _, model_dir, _ = setup
    out = tmp / "eval.json"
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--template", str(template),
                 "--limit", "20", "--max-new-tokens", "6", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out.read_text())
    assert printed[-1] == f"exact match: {100 * result['exact_match']:.1f}%"
    assert any(line.strip().startswith("nli:") for line in printed)
    predictions = result["predictions"]
    assert len(predictions) == result["total"] == 20
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(p["output"], p["prediction"])["rougeL"].fmeasure for p in predictions]
    exact = [squad_normalize(p["output"]) == squad_normalize(p["prediction"]) for p in predictions]
    assert result["rouge_l"] == pytest.approx(sum(rouge) / 20)
    assert result["exact_match"] == pytest.approx(sum(exact) / 20)
    assert [p["output"] for p in predictions] == [r["output"] for r in rows[:20]]
    with_options = [p for p in predictions if p.get("options")]
    assert result["option_rows"] == len(with_options) > 0
    assert set(result["per_task"]) <= {"nli", "sentiment"}


def test_eval_reads_messages_rows_and_reports_bad_input(setup, tmp_path, capsys):
    _, _, _, template, _, model_dir, _ = setup
    rows = tmp_path / "m.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "Say yes."},
                                             {"role": "assistant", "content": "yes"}]}) + "\n")
    assert main(["eval", "--model", str(model_dir), "--data", str(rows), "--template", str(template),
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("exact match: ")
    rows.write_text('{"instruction": "x", "output": "y"}\n{"instruction": \n')
    assert main(["eval", "--model", str(model_dir), "--data", str(rows), "--template", str(template)]) == 2
    err = capsys.readouterr().err
    assert "m.jsonl:2: malformed JSON" in err and "Traceback" not in err
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", str(rows)]) == 2


def eval_data_config(setup, tmp_path, rows: int, steps: int):
    """The demo recipe's config for `steps` steps with `[train] eval_data`: the first `rows` rows."""
    tmp, data, all_rows, template, tokenizer, model_dir, recipe = setup
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in all_rows[:rows]))
    cfg = recipe.train_config(tmp_path, model_dir, data, tokenizer, template, 0)
    cfg.train.max_steps = steps
    cfg.train.eval_data = str(held)
    return cfg


def metrics_records(cfg) -> list[dict]:
    lines = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_training_logs_generation_metrics_beside_the_eval_loss(setup, tmp_path):
    from packtune.run import run

    cfg = eval_data_config(setup, tmp_path, rows=4, steps=4)
    cfg.train.eval_generate_every = 2
    cfg.train.eval_every = 2
    cfg.train.eval_fraction = 0.1
    run(cfg)
    records = metrics_records(cfg)
    generated = [r for r in records if "eval_exact_match" in r]
    assert [r["step"] for r in generated] == [2, 4]
    assert all(r["eval_rows"] == 4 and 0 <= r["eval_rouge_l"] <= 1 for r in generated)
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]


def _train_worker(rank: int, world: int, port: int, cfg) -> None:
    from packtune.run import run

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(cfg)


def test_two_ranks_share_the_eval_rows_and_log_what_one_process_scores(setup, tmp_path):
    """FSDP over 2 gloo ranks: rank r answers rows r, r + 2, ... (5 rows: 3 and 2) with the gathered
    parameters; the metrics rank 0 logs == one process scoring the exported model on all rows."""
    import torch.multiprocessing as mp
    from test_train_dist import free_port

    from packtune.datatools.evaluate import TrainingEval
    from packtune.model.hf_io import load_pretrained

    cfg = eval_data_config(setup, tmp_path, rows=5, steps=2)
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_train_worker, args=(2, free_port(), cfg), nprocs=2)
    [logged] = [r for r in metrics_records(cfg) if "eval_exact_match" in r]
    evaluation = TrainingEval(cfg.train.eval_data, cfg.data.tokenizer, cfg.data.template)
    alone = evaluation(load_pretrained(Path(cfg.train.output_dir) / "final"))
    assert logged == {"step": 2, **{f"eval_{k}": v for k, v in alone.items() if k != "per_task"}}
    assert logged["eval_rows"] == 5
