"""`packtune bench e2e`: options, the equal-work plan, FLOP counting, the generated data's shape."""

import json
import math

import pytest

from packtune.bench import e2e
from packtune.bench.alpaca_like import generate_rows, length_stats
from packtune.bench.e2e_common import MODELS, alpaca_prompt, flops_per_token, hf_config


def test_options_default_and_explicit():
    args = e2e.build_parser().parse_args([])
    assert (args.model, args.impl, args.tokens, args.max_tokens) == (None, None, 24_000, 2048)
    args = e2e.build_parser().parse_args(["--model", "large", "--impl", "packtune", "--impl", "trl-packing",
                                          "--tokens", "1000", "--lr", "3e-4"])
    assert args.model == ["large"] and args.impl == ["packtune", "trl-packing"]
    assert (args.tokens, args.lr) == (1000, 3e-4)
    with pytest.raises(SystemExit):
        e2e.build_parser().parse_args(["--impl", "axolotl"])


def test_plan_takes_the_first_rows_holding_the_token_budget():
    args = e2e.build_parser().parse_args(["--tokens", "1000", "--step-tokens", "400", "--max-tokens", "200",
                                          "--padding-batch", "2"])
    shape = e2e.plan(args, {"lengths": [100, 300, 200, 500, 100, 100]})
    assert (shape["rows"], shape["tokens"]) == (4, 1100)
    assert shape["mean_length"] == 275
    assert shape["rows_per_micro_batch"] == 2  # 2 packed rows of 200 tokens = 400 tokens per step
    assert shape["padding_micro_batches"] == 1  # 2 samples of ~275 tokens: closest to 400 per step
    assert shape["context"] == pytest.approx((100**2 + 300**2 + 200**2 + 500**2) / 1100)


def test_flops_per_token_by_hand():
    config = hf_config("small")
    assert config["vocab_size"] == 32000 and MODELS["small"]["hidden_size"] == 256
    h, layers, inter, vocab = 256, 4, 688, 32000
    params = layers * (4 * h * h + 3 * h * inter) + h * vocab
    assert flops_per_token(config, 200) == 6 * params + 12 * layers * h * 200
    # LoRA rank 16 on all linears: PEFT counts 312,320 trainable parameters on this model
    assert flops_per_token(config, 200, 16) == 4 * params + 6 * 312_320 + 12 * layers * h * 200


def test_alpaca_prompt_variants():
    assert alpaca_prompt({"instruction": "Do it.", "input": "", "output": "x"}).endswith(
        "completes the request.\n\n### Instruction:\nDo it.\n\n### Response:")
    with_input = alpaca_prompt({"instruction": "Do it.", "input": "data", "output": "x"})
    assert "paired with an input" in with_input and with_input.endswith("### Input:\ndata\n\n### Response:")


def test_generated_rows_are_deterministic_and_alpaca_shaped(tmp_path):
    import sentencepiece as spm

    from packtune.demo.tokenizer_training import train_tokenizer

    rows = generate_rows(600, seed=1)
    assert rows == generate_rows(600, seed=1)
    assert set(rows[0]) == {"instruction", "input", "output"}
    model = train_tokenizer((alpaca_prompt(r) + " " + r["output"] for r in rows), tmp_path / "t.model", 4000,
                            model_type="bpe")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    stats = length_stats(rows, lambda r: (1 + len(sp.encode(alpaca_prompt(r))),
                                          1 + len(sp.encode(r["output"]))))
    json.dumps(stats)
    assert 150 < stats["mean"] < 260 and stats["median"] < stats["mean"] < stats["p90"] < stats["max"]
    assert 0.6 < stats["response_share"] < 0.8
    assert 0.3 < stats["input_share"] < 0.5


@pytest.mark.slow
def test_tiny_trl_run_end_to_end(tmp_path):
    pytest.importorskip("trl")
    results = e2e.main(["--tokens", "800", "--rows", "300", "--eval-rows", "2", "--step-tokens", "2048",
                        "--threads", "1", "--impl", "trl-padding", "--impl", "trl-packing",
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert [r["implementation"] for r in results] == ["trl-padding", "trl-packing"]
    for r in results:
        assert "error" not in r, r
        assert r["real_tokens"] > r["label_tokens"] > 0 and r["train_s"] > 0 and r["steps"] >= 1
        assert r["heldout_loss"] > 0 and 0 < r["mfu"] < 1
    assert results[0]["label_tokens"] == results[1]["label_tokens"]
    assert json.loads((tmp_path / "out" / "e2e.json").read_text())[1]["implementation"] == "trl-packing"


@pytest.mark.slow
def test_tiny_lora_runs_end_to_end(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    pytest.importorskip("torchao", reason="packtune-qlora needs the qlora extra (torchao)")
    results = e2e.main(["--tokens", "800", "--rows", "300", "--eval-rows", "2", "--step-tokens", "2048",
                        "--threads", "1", "--impl", "packtune-lora", "--impl", "packtune-qlora",
                        "--impl", "trl-lora", "--work", str(tmp_path / "work"),
                        "--out", str(tmp_path / "out")])
    assert [r["implementation"] for r in results] == ["packtune-lora", "packtune-qlora", "trl-lora"]
    for r in results:
        assert "error" not in r, r
        assert r["real_tokens"] > r["label_tokens"] > 0 and r["steps"] >= 1 and r["heldout_loss"] > 0
    lora, qlora, trl = results
    # the same answers trained (TRL tokenizes prompt and completion apart: a token or two differ)
    assert abs(lora["label_tokens"] - trl["label_tokens"]) <= 0.01 * trl["label_tokens"]
    assert qlora["label_tokens"] == lora["label_tokens"] and qlora["train_losses"] != lora["train_losses"]
    assert {"speedup_vs_trl-lora", "speedup_vs_packtune-lora"} <= qlora.keys()
    assert "speedup_vs_trl-lora" in lora and "speedup_vs_packtune-lora" not in lora


def test_t5_options_flops_and_input_budget():
    args = e2e.build_parser().parse_args(["--model", "t5", "--max-tokens", "1000"])
    assert args.model == ["t5"]
    from packtune.bench.e2e_t5 import pair_flops_per_token, t5_config
    from packtune.model.config import ModelArgs
    from packtune.model.families.t5 import pair_flops

    pairs = [(30, 10), (5, 40)]
    expected = (pair_flops(ModelArgs.from_hf_config(t5_config("t5")), 30, 10)
                + pair_flops(ModelArgs.from_hf_config(t5_config("t5")), 5, 40)) / 85
    assert pair_flops_per_token("t5", pairs) == expected
    # a row's input budget: the inputs' share of --max-tokens, at least the longest input
    meta = {"lengths": [100, 300, 200], "input_lengths": [60, 250, 90]}
    assert e2e._t5_input_budget(args, meta, {"rows": 3, "tokens": 600}) == 667
    assert e2e._t5_input_budget(e2e.build_parser().parse_args(["--max-tokens", "300"]), meta,
                                {"rows": 3, "tokens": 600}) == 250


@pytest.mark.slow
def test_tiny_t5_runs_end_to_end(tmp_path):
    pytest.importorskip("datasets")
    results = e2e.main(["--model", "t5", "--tokens", "800", "--rows", "300", "--eval-rows", "2",
                        "--step-tokens", "2048", "--threads", "1", "--work", str(tmp_path / "work"),
                        "--out", str(tmp_path / "out")])
    assert [r["implementation"] for r in results] == ["packtune", "seq2seq-trainer"]
    for r in results:
        assert "error" not in r, r
        assert r["real_tokens"] > r["label_tokens"] > 0 and r["train_s"] > 0 and r["steps"] >= 1
        assert r["heldout_loss"] > 0 and 0 < r["mfu"] < 1
    packtune, trainer = results
    assert packtune["label_tokens"] == trainer["label_tokens"]  # the same answers, EOS after each
    assert "speedup_vs_seq2seq-trainer" in packtune


def test_moe_flops_count_the_routed_experts():
    config = hf_config("moe")
    assert config["model_type"] == "qwen3_moe" and config["output_router_logits"]
    h, layers, vocab, k, experts, width = 256, 4, 32000, 4, 16, 128
    params = layers * (4 * h * h + k * 3 * h * width + h * experts) + h * vocab
    assert flops_per_token(config, 200) == 6 * params + 12 * layers * h * 200
    adapters = layers * 16 * (6 * h + 2 * h + k * (2 * h + 3 * width))
    assert flops_per_token(config, 200, 16) == 4 * params + 6 * adapters + 12 * layers * h * 200


@pytest.mark.slow
def test_tiny_moe_runs_end_to_end(tmp_path):
    """docs/moe.md's command at a tiny size: packtune full and LoRA, and TRL, on the Qwen3-MoE."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    results = e2e.main(["--model", "moe", "--tokens", "800", "--rows", "300", "--eval-rows", "2",
                        "--step-tokens", "2048", "--threads", "1", "--impl", "packtune",
                        "--impl", "trl-packing", "--impl", "packtune-lora", "--work", str(tmp_path / "work"),
                        "--out", str(tmp_path / "out")])
    assert [r["implementation"] for r in results] == ["packtune", "trl-packing", "packtune-lora"]
    for r in results:
        assert "error" not in r, r
        assert r["real_tokens"] > r["label_tokens"] > 0 and r["steps"] >= 1 and r["heldout_loss"] > 0
    assert "speedup_vs_trl-packing" in results[0] and results[2]["steps"] == results[0]["steps"]


def test_dpo_options_pairs_and_plan():
    from packtune.bench import e2e_dpo

    args = e2e.build_parser().parse_args(["--objective", "dpo", "--pairs", "5", "--pairs-per-step", "4",
                                          "--padding-batch", "2", "--impl", "trl-padding-free"])
    assert (args.objective, args.impl, args.beta) == ("dpo", ["trl-padding-free"], 0.1)
    assert e2e.build_parser().parse_args([]).objective == "sft"
    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("a", "b", "c")]
    pairs = e2e_dpo.make_pairs(records, seed=0)
    assert pairs == e2e_dpo.make_pairs(records, seed=0) and 0 < len(pairs) <= 3
    for p in pairs:
        assert p["prompt"] == alpaca_prompt(next(r for r in records if r["output"] == p["chosen"][1:]))
        assert p["chosen"] != p["rejected"] and p["rejected"][0] == " "
    # (prompt, chosen, rejected) tokens of 6 pairs: 5 taken, 2 micro-batches of 2 pairs per step
    shape = e2e_dpo.plan(args, [(10, 5, 5), (10, 20, 10), (30, 5, 5), (10, 5, 5), (10, 5, 5), (99, 99, 99)])
    assert (shape["pairs"], shape["pairs_per_step"], shape["micro_batches"], shape["steps"]) == (5, 4, 2, 2)
    assert shape["mean_shared_tokens"] == 28 and shape["max_tokens"] == 70  # the longest unshared pair
    assert e2e_dpo.plan(e2e.build_parser().parse_args(["--pairs", "2", "--padding-batch", "4"]),
                        [(10, 20, 10), (10, 20, 30)])["max_tokens"] == 200  # 4 shared pairs of 50


def test_dpo_refuses_other_sides_and_models(capsys):
    refusals = ((["--impl", "trl-packing"], "no side trl-packing"), (["--model", "large"], "small Llama"))
    for argv, what in refusals:
        with pytest.raises(SystemExit):
            e2e.main(["--objective", "dpo", *argv])
        assert what in capsys.readouterr().err
    for side in ("trl-padding-free", "trl-padding-packtune"):
        with pytest.raises(SystemExit):
            e2e.main(["--impl", side])
        assert "a DPO side" in capsys.readouterr().err


def test_accuracy_counts_ties_against_chosen():
    from packtune.bench.e2e_dpo import accuracy

    assert accuracy([(-1.0, -2.0), (-3.0, -3.0), (-5.0, -4.0), (-0.5, -9.0)]) == 0.5
    assert accuracy([]) == 0


@pytest.mark.slow
def test_tiny_dpo_runs_both_sides_on_the_same_pairs(tmp_path):
    """docs/preference.md's benchmark at a tiny size: packtune's DPO and TRL's DPOTrainer train the same
    pairs from the same weights (the same reference log-probs, step-1 loss to 1e-5); TRL's padding_free
    runs or is reported as turned back into padding; TRL with apply_packtune trains TRL's run."""
    pytest.importorskip("trl", reason="the DPO baseline is TRL's DPOTrainer (the test extra)")
    results = e2e.main(["--objective", "dpo", "--pairs", "4", "--pairs-per-step", "4", "--padding-batch", "2",
                        "--rows", "300", "--eval-rows", "3", "--threads", "1",
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert [r["implementation"] for r in results] == ["packtune", "trl-padding", "trl-padding-free",
                                                      "trl-padding-packtune"]
    packtune, trl, padding_free, trl_packtune = results
    for r in (packtune, trl, trl_packtune):
        assert "error" not in r, r
        assert r["samples"] == 4 and r["steps"] >= 1 and r["peak_bytes"] > 0
        assert r["pairs_per_s"] > 0 and r["pairs_per_cpu_s"] > 0
        assert 0 <= r["heldout_accuracy"] <= 1
    assert packtune["reference_max_rel_error"] < 1e-5  # the same tokens and initial model
    assert packtune["label_tokens"] == trl["label_tokens"]  # the same responses, EOS after each
    assert packtune["step1_loss_rel_diff_vs_trl-padding"] < 1e-5
    assert packtune["train_losses"][0] == pytest.approx(math.log(2), rel=1e-6)  # the policy is its reference
    assert trl["reference_bytes"] > 0
    assert {"speedup_vs_trl-padding", "cpu_speedup_vs_trl-padding", "memory_vs_trl-padding"} <= set(packtune)
    # TRL's loop with packtune's policy forward: the same run to fp32 rounding (the same tokens and steps)
    assert trl_packtune["label_tokens"] == trl["label_tokens"] and trl_packtune["steps"] == trl["steps"]
    assert trl_packtune["train_losses"] == pytest.approx(trl["train_losses"], rel=1e-4)
    assert "speedup_vs_trl-padding" in trl_packtune
    if "error" in padding_free:
        assert "back into padding" in padding_free["error"]
    assert json.loads((tmp_path / "out" / "e2e_dpo.json").read_text())[0]["implementation"] == "packtune"
