"""A T5 through `packtune train`'s own path: records -> (input, target) pairs (data/pairs.py), packed on
both sides (data/pair_rows.py), trained by the Trainer with Seq2SeqLoss.

A packed row's loss and gradients equal the sum over its pairs alone; `packtune train` runs two steps,
full and LoRA, exporting what transformers and PEFT load with packtune's logits; a run killed by SIGKILL
resumes with identical losses."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import toy_training
from data_fixtures import alpaca_rows, trained_tokenizers, write_jsonl
from t5_fixtures import save_hf_t5

from packtune.cli import main
from packtune.config import DataConfig
from packtune.data import prepare_dataset
from packtune.data.pair_rows import PairRows, pack_pairs_2d, target_budget
from packtune.data.pairs import pair_lengths
from packtune.data.tokenizer import load_tokenizer
from packtune.model.hf_io import load_pretrained
from packtune.model.t5_batch import pack_pairs
from packtune.seq2seq_loss import Seq2SeqLoss

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    tokenizer = trained_tokenizers(tmp_path_factory)["sp"]
    model = save_hf_t5("t5_v11", root / "model", vocab_size=600)
    shutil.copyfile(tokenizer, model / "spiece.model")  # T5's name for its sentencepiece model
    return {"model": model, "tokenizer": tokenizer,
            "alpaca": write_jsonl(root / "alpaca.jsonl", alpaca_rows(40, max_words=20))}


def data_config(assets, tmp_path, **keys) -> DataConfig:
    return DataConfig(path=str(assets["alpaca"]), tokenizer=str(assets["tokenizer"]), max_tokens=256,
                      num_workers=1, cache_dir=str(tmp_path / "cache"), **keys)


def test_a_pair_is_the_prompt_and_the_answer_each_ending_with_eos(tmp_path, assets):
    dataset = prepare_dataset(data_config(assets, tmp_path), pairs=True)
    assert len(dataset) == 40  # one pair per record
    tok = load_tokenizer(assets["tokenizer"])
    inputs, targets = pair_lengths(dataset)
    record = json.loads(Path(assets["alpaca"]).read_text().splitlines()[0])
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    first = dataset.tokens[: dataset.lengths[0]].tolist()
    assert first[: inputs[0]] == [*tok.encode_text(prompt), tok.eos_id]  # no BOS: T5 has none
    assert first[inputs[0]:] == [*tok.encode_text(record["output"]), tok.eos_id]
    assert not dataset.mask[: inputs[0]].any() and dataset.mask[inputs[0] : dataset.lengths[0]].all()

    longest = int(targets.max())
    cut = prepare_dataset(data_config(assets, tmp_path, max_target_tokens=longest - 2, truncation="truncate"),
                          pairs=True)
    _, cut_targets = pair_lengths(cut)
    assert len(cut) == 40 and cut_targets.max() == longest - 2
    ends = np.cumsum(cut.lengths) - 1
    assert (cut.tokens[ends] == tok.eos_id).all()  # EOS kept last, as transformers truncates
    dropped = prepare_dataset(data_config(assets, tmp_path, max_target_tokens=longest - 2), pairs=True)
    assert len(dropped) == 40 - int((targets > longest - 2).sum())


def test_pairs_refuse_text_records_and_training_on_inputs(tmp_path, assets):
    from packtune.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match='train_on = "all"'):
        prepare_dataset(data_config(assets, tmp_path, train_on="all"), pairs=True)
    texts = write_jsonl(tmp_path / "text.jsonl", [{"text": "just text"}])
    with pytest.raises(DataError, match="a text record has no prompt and answer"):
        prepare_dataset(DataConfig(path=str(texts), tokenizer=str(assets["tokenizer"]), num_workers=1,
                                   cache_dir=str(tmp_path / "cache")), pairs=True)


def test_two_dimensional_packing_needs_few_more_rows_than_either_side_alone():
    rng = np.random.default_rng(0)
    inputs, targets = rng.integers(1, 60, 500), rng.integers(1, 20, 500)
    budgets = (128, target_budget(inputs, targets, 128))
    assert budgets[1] == 48  # the inputs' budget x the data's target / input ratio, a multiple of 8
    order = np.argsort(-np.maximum(inputs / budgets[0], targets / budgets[1]), kind="stable")
    row_of = pack_pairs_2d(inputs, targets, budgets, order, 64)
    assert (np.bincount(row_of, inputs) <= budgets[0]).all()
    assert (np.bincount(row_of, targets) <= budgets[1]).all()
    fewest = max(inputs.sum() / budgets[0], targets.sum() / budgets[1])  # no packing can use fewer rows
    assert row_of.max() + 1 <= 1.03 * np.ceil(fewest)


def test_a_packed_row_trains_as_its_pairs_one_at_a_time(tmp_path, assets):
    """Float64: a packed row's summed loss and every gradient equal those of the row's pairs each in a row
    of its own (the encoder, the decoder and cross-attention never look across pairs)."""
    dataset = prepare_dataset(data_config(assets, tmp_path), pairs=True)
    model = load_pretrained(assets["model"], dtype=torch.float64)
    start = model.args.decoder_start_token_id
    rows = PairRows.packed(dataset, 96, 0, start, "bfd")
    assert len(rows) < len(dataset) // 2  # several pairs per row
    assert sorted(np.concatenate([rows.samples(r) for r in range(len(rows))]).tolist()) == list(range(40))
    alone = PairRows.one_per_row(dataset, start)

    def loss_and_grads(batches):  # float64 throughout (the fused loss keeps fp32 token losses)
        model.zero_grad()
        total = sum(torch.nn.functional.cross_entropy(
            model.lm_head(model.hidden_states(b.input_ids, b.decoder_input_ids, b.layout)), b.labels,
            reduction="sum") for b in batches)
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters()]

    row = rows.collate(0)
    pairs = rows.samples(0)
    singles = [alone.collate(int(i)) for i in pairs]
    packed_loss, packed_grads = loss_and_grads([row])
    single_loss, single_grads = loss_and_grads(singles)
    assert row.num_label_tokens == row.num_items == int(dataset.label_counts[pairs].sum())
    torch.testing.assert_close(packed_loss, single_loss, rtol=1e-12, atol=0)
    for got, expected in zip(packed_grads, single_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
    with torch.no_grad():  # the Trainer's loss module on the same rows
        fused = lambda b: Seq2SeqLoss(model)(b.input_ids, b.labels, b.layout, **b.loss_inputs()).double()
        torch.testing.assert_close(fused(row), packed_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(sum(fused(b) for b in singles), packed_loss, rtol=1e-6, atol=0)
    # the row as the model's own packing helper builds it from the same pairs
    tokens = [dataset.tokens[dataset.offsets[i] : dataset.offsets[i + 1]].tolist() for i in pairs]
    split = [(ids[:n], ids[n:]) for ids, n in zip(tokens, pair_lengths(dataset)[0][pairs], strict=True)]
    same = pack_pairs(split, start)
    for name in ("input_ids", "decoder_input_ids", "labels"):
        assert torch.equal(getattr(row, name), getattr(same, name)), name


def argv(assets, recipe: str, out: Path, *extra: str) -> list[str]:
    overrides = [f'model.path="{assets["model"]}"', f'data.path="{assets["alpaca"]}"',
                 f'data.tokenizer="{assets["tokenizer"]}"', "data.max_tokens=96", "data.num_workers=1",
                 f'data.cache_dir="{out.parent / "cache"}"', f'train.output_dir="{out}"', "train.log_every=1",
                 'train.device="cpu"', 'data.template="auto"', *extra]
    return ["train", str(CONFIGS / recipe), *[a for o in overrides for a in ("--set", o)]]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_two_steps_full_then_transformers_loads_the_export(tmp_path, assets, capsys):
    out = tmp_path / "run"
    questions = write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(3, seed=5, max_words=8))
    assert main(argv(assets, "demo.toml", out, "train.max_steps=2", f'train.eval_data="{questions}"')) == 0
    text = capsys.readouterr().out
    assert "step 2/2" in text and "pairs: each row holds at most 96 input and" in text
    assert "all samples: packed rows" in text  # the data report
    assert "step 2/2 | eval exact match" in text and "(3 records)" in text  # answers generated by the T5
    steps = [r for r in history(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(0 < r["loss"] < float("inf") for r in steps)
    exported = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    ours = load_pretrained(out / "final", dtype=torch.float32).eval()
    batch = pack_pairs([([5, 9, 23, 2], [40, 41, 2])], ours.args.decoder_start_token_id)
    with torch.no_grad():
        expected = exported(input_ids=batch.input_ids[None], labels=batch.labels[None]).logits[0]
        got = ours(batch.input_ids, batch.decoder_input_ids, batch.layout)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    before = load_pretrained(assets["model"], dtype=torch.float32).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in ours.state_dict().items())  # it trained


def test_options_for_decoders_only_are_refused_in_one_line(tmp_path, assets, capsys):
    assert main(argv(assets, "demo.toml", tmp_path / "run", "train.max_steps=1", "train.tiled_mlp=16")) == 2
    err = capsys.readouterr().err
    assert "train.tiled_mlp = 16: tiling covers decoder-only models' MLPs, not t5's" in err
    assert "Traceback" not in err


def test_preference_and_an_encoder_decoder_refuse_each_other_in_one_line(tmp_path, assets, capsys):
    from packtune.config import Config
    from packtune.errors import ConfigError, DataError
    from packtune.preference.loss import preference_loss

    dpo = argv(assets, "demo.toml", tmp_path / "run", "train.max_steps=1", 'train.objective="dpo"')
    for command in (dpo, ["check", *dpo[1:]]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "train.objective = 'dpo': preference objectives train decoder-only models, not an " \
               "encoder-decoder (t5)" in err and "Traceback" not in err
    cfg = Config()
    cfg.train.objective = "dpo"
    with pytest.raises(ConfigError, match=r"not an encoder-decoder \(t5\)"):  # the Trainer's loss module
        preference_loss(cfg, load_pretrained(assets["model"], dtype=torch.float32))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}])
    with pytest.raises(DataError, match=r"preference records \(chosen / rejected\) train decoder-only"):
        prepare_dataset(DataConfig(path=str(prefs), tokenizer=str(assets["tokenizer"]), num_workers=1,
                                   cache_dir=str(tmp_path / "cache")), pairs=True)
    assert main(["eval", "--model", str(assets["model"]), "--data", str(prefs)]) == 2
    err = capsys.readouterr().err
    assert "preference pairs are scored by decoder-only models" in err and "Traceback" not in err


def test_train_lora_two_steps_exports_an_adapter_peft_loads(tmp_path, assets):
    peft = pytest.importorskip("peft")
    from packtune.lora import load_adapter_into

    out = tmp_path / "lora"
    assert main(argv(assets, "lora_demo.toml", out, "train.max_steps=2", "lora.rank=4",
                     'train.export="adapter"')) == 0
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    ours = load_pretrained(assets["model"], dtype=torch.float32)
    load_adapter_into(ours, out / "final")
    assert any(p.abs().max() > 0 for n, p in ours.named_parameters() if "lora_B" in n)  # it trained
    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(assets["model"], dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, out / "final").eval()
    batch = pack_pairs([([5, 9, 23, 2], [40, 41, 2])], ours.args.decoder_start_token_id)
    with torch.no_grad():
        expected = theirs(input_ids=batch.input_ids[None], labels=batch.labels[None]).logits[0]
        got = ours.eval()(batch.input_ids, batch.decoder_input_ids, batch.layout)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_a_killed_run_resumes_with_identical_losses(tmp_path, assets):
    def run(*args):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, toy_training.__file__, *args], env=env, capture_output=True,
                              text=True, timeout=300)

    args = lambda out: argv(assets, "demo.toml", out, "train.epochs=2", "train.micro_batches=1",
                            "train.save_every=2", "train.export=false")
    reference = run("cli", *args(tmp_path / "a"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = run("kill_at=3", "cli", *args(tmp_path / "b"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run("cli", *args(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "label_tokens")
    expected = [[r.get(k) for k in keys] for r in history(tmp_path / "a")]
    assert len(expected) > 3
    assert [[r.get(k) for k in keys] for r in history(tmp_path / "b")] == expected


def check_argv(assets, tmp_path) -> list[str]:
    return ["check", *argv(assets, "demo.toml", tmp_path / "run")[1:]]


def test_check_packed_equals_unpacked_for_both_stacks(tmp_path, assets, capsys):
    """`packtune check` on a T5: rows of pairs against each pair in a row of its own, and 2 micro-batches
    against one twice the size (a shrunken copy of the model: 2 blocks per stack)."""
    assert main(check_argv(assets, tmp_path)) == 0
    out = capsys.readouterr().out
    for line in ("packed == unpacked", "2 micro-batches == 1 batch"):
        assert "PASS" in next(text for text in out.splitlines() if line in text)
    assert out.rstrip().endswith("packtune check: PASS")


def test_check_under_torchrun_two_ranks_equal_one_process(tmp_path, assets):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "packtune", *check_argv(assets, tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = next(line for line in proc.stdout.splitlines() if "2 ranks == 1 process" in line)
    assert "PASS" in ranks and "packtune check: PASS" in proc.stdout
