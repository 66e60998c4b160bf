"""`packtune demo --quick`: the whole pipeline end to end at toy size, and its exported model."""

import json

import pytest
import torch

from packtune.cli import main


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    assert last.startswith("held-out exact match: ") and "(before training: " in last
    assert "sample generations before training:" in printed
    assert "sample generations after training:" in printed

    metrics = json.loads((out / "demo.json").read_text())
    assert metrics["heldout"]["total"] == 8 * 3 and metrics["unseen_phrasing"]["total"] == 8 * 3
    # The headline leaves out the tasks the recipe names, with the reason printed; it is the exact
    # match over the other tasks' records.
    assert "not in the headline: count (counting needs" in printed
    assert "% over 7 tasks (before training: " in last
    per_task = metrics["heldout"]["per_task"]
    scored = [t for name, t in per_task.items() if name != "count"]
    expected = sum(t["exact_match"] * t["rows"] for t in scored) / sum(t["rows"] for t in scored)
    assert metrics["headline"] == pytest.approx(expected)
    assert f"{100 * metrics['headline']:.1f}%" in last
    assert (out / "loss_curve.png").exists() or (out / "loss_curve.txt").exists()
    losses = [json.loads(line)["loss"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) > 5 and sum(losses[-3:]) < sum(losses[:3])  # it learned something

    # The export is a Hugging Face directory: transformers loads it and agrees with packtune's model.
    transformers = pytest.importorskip("transformers")
    from packtune.model.hf_io import load_pretrained

    final = metrics["model_dir"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_pretrained(final).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_quick_t5_demo_end_to_end(tmp_path, capsys):
    """`packtune demo --model t5 --quick`: the same pipeline on a T5 trained on (prompt, answer) pairs; its
    export loads in transformers with packtune's logits."""
    out = tmp_path / "demo"
    assert main(["demo", "--model", "t5", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model: T5ForConditionalGeneration, 1 + 1 blocks" in printed
    assert "pairs: each row holds at most 128 input and" in printed
    assert printed.strip().splitlines()[-1].startswith("held-out exact match: ")
    metrics = json.loads((out / "demo.json").read_text())
    assert metrics["heldout"]["total"] == 8 * 3
    losses = [json.loads(line)["loss"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) > 5 and sum(losses[-3:]) < sum(losses[:3])  # it learned something

    transformers = pytest.importorskip("transformers")
    from packtune.model.hf_io import load_pretrained
    from packtune.model.t5_batch import pack_pairs

    final = metrics["model_dir"]
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_pretrained(final).eval()
    batch = pack_pairs([([5, 9, 42, 7, 2], [11, 3, 2])], ours.args.decoder_start_token_id)
    with torch.no_grad():
        expected = theirs(input_ids=batch.input_ids[None], labels=batch.labels[None]).logits[0]
        got = ours(batch.input_ids, batch.decoder_input_ids, batch.layout)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_demo_stopped_by_a_signal_ends_in_one_line(tmp_path, capsys, monkeypatch):
    """A run stopped by SIGTERM / SIGINT returns no model: the demo says so instead of loading None."""
    import packtune.run

    monkeypatch.setattr(packtune.run, "run", lambda cfg: None)
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("packtune demo: training error: the demo's training stopped before its end")
    assert "Traceback" not in "\n".join(err)
