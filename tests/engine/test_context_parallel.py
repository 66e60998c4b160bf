"""Context parallelism: a packed row split into chunks over ranks trains exactly like the whole row.

Host side (no process group): the chunks, their labels (shifted on the whole row, so a chunk's last
token predicts the next chunk's first), label rows and loss items, the kv-head replication rule,
and the data report's chunk layouts. On two gloo ranks: Ulysses attention over the row's chunks
equals varlen attention over the whole row (values and gradients, GQA with kv heads replicated),
and a Trainer with context_parallel = 2 logs the losses and gradient norms of one process to 1e-6
relative over 3 steps, on rows whose samples cross the chunk boundary and rows of many short
samples, with every loss weighting.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_train_dist import free_port
from toy_training import ListSampler, packed, tiny_llama

from packtune.config import TrainConfig
from packtune.context_parallel import ContextParallel, chunk_layouts, context_chunk, kv_repeat
from packtune.errors import ConfigError
from packtune.kernels import varlen_attention
from packtune.kernels.packed_layout import IGNORE_INDEX
from packtune.parallel import init_distributed, shutdown
from packtune.train import Trainer

STEPS = 3


def row(lengths, seed=0, weighting="token"):
    """A packed row of samples of these lengths, about 70% of the tokens trained."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(0, 37, (n,), generator=g)
        trained = torch.rand(n, generator=g) < 0.7
        labels = torch.full((n,), IGNORE_INDEX)
        labels[:-1] = torch.where(trained[1:], ids[1:], IGNORE_INDEX)
        samples.append((ids, labels))
    return packed(samples, weighting)


@pytest.mark.parametrize("size", [2, 3])
def test_chunks_partition_the_row(size):
    batch = row([9, 14, 5], seed=1)
    chunks = [context_chunk(batch, ContextParallel(None, r, size)) for r in range(size)]
    assert torch.equal(torch.cat([c.input_ids for c in chunks]), batch.input_ids)
    assert torch.equal(torch.cat([c.labels for c in chunks]), batch.labels)  # shifted before the split
    assert torch.equal(torch.cat([c.layout.positions for c in chunks]), batch.layout.positions)
    assert max(c.input_ids.numel() for c in chunks) - min(c.input_ids.numel() for c in chunks) <= 1
    assert sum(c.num_label_tokens for c in chunks) == batch.num_label_tokens
    assert sum(c.num_items for c in chunks) == batch.num_items
    start = 0
    for c in chunks:
        assert torch.equal(c.layout.cu_seqlens, batch.layout.cu_seqlens)  # attention sees the whole row
        assert c.layout.max_seqlen == batch.layout.max_seqlen
        assert torch.equal(c.labels[c.layout.label_rows], batch.labels[c.layout.label_rows + start])
        start += c.input_ids.numel()
    # a sample crossing the boundary: chunk 0's last label is the first token of chunk 1
    first = chunks[0]
    assert first.labels[-1] == chunks[1].input_ids[0] or first.labels[-1] == IGNORE_INDEX


def test_sample_weighting_items_on_the_first_chunk():
    batch = row([9, 14, 5], seed=2, weighting="sample")
    chunks = [context_chunk(batch, ContextParallel(None, r, 2)) for r in range(2)]
    assert [c.num_items for c in chunks] == [batch.num_items, 0]
    assert torch.equal(torch.cat([c.loss_weights for c in chunks]), batch.loss_weights)


def test_kv_repeat():
    assert kv_repeat(4, 2, 2) == 1
    assert kv_repeat(4, 1, 2) == 2  # MQA: the kv head replicated
    assert kv_repeat(9, 3, 3) == 1
    assert kv_repeat(8, 2, 4) == 2
    with pytest.raises(ConfigError, match="9 attention heads do not divide by 2"):
        kv_repeat(9, 3, 2)


def test_chunk_layouts_report():
    from packtune.data.packing import PackedRows

    class Data:  # rows of [4, 4] (the boundary between the samples) and [3, 5] (a sample across it)
        lengths = np.array([4, 4, 3, 5])

    rows = PackedRows(Data(), np.array([0, 0, 1, 1]), 8)
    assert chunk_layouts(rows, 2) == {1: 1, 2: 1}
    assert chunk_layouts(rows, 4) == {2: 1, 3: 1}  # [0, 3) over chunks 0-1, [3, 8) over 1-3


def test_context_parallel_config_checks(monkeypatch, tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), context_parallel=2)
    with pytest.raises(ConfigError, match=r"number of ranks \(1\) must be a multiple"):
        cfg.check()
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg.check()
    with pytest.raises(ConfigError, match="needs train.activation_checkpointing"):
        TrainConfig(output_dir=str(tmp_path), offload_activations=True).check()
    with pytest.raises(ConfigError, match="tile size in tokens"):
        TrainConfig(output_dir=str(tmp_path), tiled_mlp=True).check()


# ---- two gloo ranks ---------------------------------------------------------------------------------


def global_steps(weighting: str):
    """3 steps of 2 rows: samples crossing the chunk boundary (long ones, one longer than half the
    row) and rows of many short samples."""
    shapes = [[23, 31, 9], [3, 4, 2, 5, 3, 6, 2, 4, 3, 5], [40, 7], [2] * 12 + [5], [17, 17, 17], [6, 39]]
    rows = [row(lengths, seed=i, weighting=weighting) for i, lengths in enumerate(shapes)]
    return [rows[2 * s: 2 * s + 2] for s in range(STEPS)]


def run_config(output_dir, weighting, **overrides):
    return TrainConfig(output_dir=str(output_dir), max_steps=STEPS, lr=1e-2, warmup=1, max_grad_norm=0.5,
                       loss_weighting=weighting, **overrides)


def attention_matches(cp: ContextParallel) -> None:
    """Ulysses attention of each rank's chunk == varlen attention of the whole row (rank's slice)."""
    torch.manual_seed(0)
    batch = row([11, 20, 6, 3], seed=5)
    for hq, hk, options in [(4, 2, {}), (4, 1, {"window": 5}), (2, 2, {"softcap": 2.0})]:
        t = batch.input_ids.numel()
        q, k, v = (torch.randn(t, h, 8, dtype=torch.float64, requires_grad=True) for h in (hq, hk, hk))
        whole = varlen_attention(q, k, v, batch.layout.cu_seqlens, batch.layout.max_seqlen, **options)
        grad = torch.randn_like(whole)
        expected = torch.autograd.grad(whole, (q, k, v), grad)
        chunk = context_chunk(batch, cp)
        a, b = chunk.layout.context.bounds[cp.rank], chunk.layout.context.bounds[cp.rank + 1]
        mine = [x[a:b].detach().requires_grad_(True) for x in (q, k, v)]
        layout = chunk.layout
        out = layout.context.attention(*mine, layout.cu_seqlens, layout.max_seqlen, **options)
        torch.testing.assert_close(out, whole[a:b], rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(out, mine, grad[a:b])  # the row's gradients of this rank's tokens
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e[a:b], rtol=1e-10, atol=1e-12)


def _worker(rank: int, world: int, port: int, root: str, model_dir: str) -> None:
    from packtune.model.loading import fill_shards, load_for_training

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_ctx = init_distributed("cpu", context_parallel=2)
    assert (dist_ctx.dp_rank, dist_ctx.dp_size, dist_ctx.context.rank) == (0, 1, rank)
    attention_matches(dist_ctx.context)
    for weighting in ("token", "turn"):
        torch.manual_seed(0)
        model = load_for_training(model_dir, dist_ctx)
        trainer = Trainer(run_config(f"{root}/cp-{weighting}", weighting), model,
                          ListSampler(global_steps(weighting)), dist_ctx)
        fill_shards(trainer.module, model_dir, dist_ctx)
        assert trainer.fit() == STEPS
    shutdown(dist_ctx)
    sys.stdout.flush()
    os._exit(0)  # see test_train_dist: skip interpreter teardown under gloo


def test_context_parallel_two_ranks_equal_one_process(tmp_path):
    from packtune.model.hf_io import save_pretrained

    os.environ["OMP_NUM_THREADS"] = "1"
    model_dir = save_pretrained(tiny_llama(tied=True, max_position_embeddings=128), tmp_path / "model")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), str(model_dir)), nprocs=2)
    torch.set_num_threads(1)
    for weighting in ("token", "turn"):
        from packtune.model.loading import load_for_training

        torch.manual_seed(0)
        dist_ctx = init_distributed("cpu")
        single = Trainer(run_config(tmp_path / f"one-{weighting}", weighting),
                         load_for_training(str(model_dir), dist_ctx), ListSampler(global_steps(weighting)),
                         dist_ctx)
        single.fit()

        def history(name):
            return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

        a, b = history(f"cp-{weighting}"), history(f"one-{weighting}")
        assert len(a) == len(b) == STEPS
        for ra, rb in zip(a, b, strict=True):
            assert (ra["tokens"], ra["label_tokens"]) == (rb["tokens"], rb["label_tokens"])
            assert abs(ra["loss"] - rb["loss"]) <= 1e-6 * rb["loss"], (ra, rb)
            assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-6 * rb["grad_norm"], (ra, rb)


# ---- `packtune train` under torchrun -----------------------------------------------------------------


@pytest.mark.slow
def test_packtune_train_with_context_parallel_resumes_after_sigkill(tmp_path, tmp_path_factory):
    """`torchrun --nproc_per_node 2 -m packtune train` with context_parallel = 2: samples up to twice
    data.max_tokens are kept, the report gives the rows' chunk layouts, both ranks killed (SIGKILL)
    after step 5 resume from step 4's checkpoint and log exactly the uninterrupted run's records."""
    import subprocess

    import toy_training
    from data_fixtures import alpaca_rows, trained_tokenizers, write_jsonl
    from test_train_recipes import CONFIGS

    from packtune.model.hf_io import save_pretrained

    model = save_pretrained(tiny_llama(vocab=600, max_position_embeddings=256), tmp_path / "model")
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(24, max_words=20))
    tokenizer = trained_tokenizers(tmp_path_factory)["sp"]
    sets = [f'model.path="{model}"', f'data.path="{data}"', f'data.tokenizer="{tokenizer}"',
            "data.max_tokens=64", "data.num_workers=1", f'data.cache_dir="{tmp_path / "cache"}"',
            "train.context_parallel=2", "train.max_steps=6", "train.save_every=2", "train.lr=1e-3",
            "train.log_every=1", "train.activation_checkpointing=true", "train.tiled_mlp=16"]

    def run(out, *kill):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               toy_training.__file__, *kill, "cli", "train", str(CONFIGS / "demo.toml"),
               *[a for o in [*sets, f'train.output_dir="{out}"'] for a in ("--set", o)]]
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)

    def history(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    from packtune.config import DataConfig
    from packtune.data import prepare_dataset

    prepared = prepare_dataset(DataConfig(path=str(data), tokenizer=str(tokenizer), max_tokens=128,
                                          num_workers=1, cache_dir=str(tmp_path / "cache")), str(tokenizer))
    assert prepared.lengths.max() > 64  # longer than data.max_tokens: kept only under context parallelism
    reference = run(tmp_path / "a")
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-3000:]
    assert "context parallel: each row split into 2 chunks of up to 64 tokens" in reference.stdout
    assert "rows 12 of max 128 tokens" in reference.stdout  # 12 samples of up to 128 tokens kept
    assert "(1 rank(s) x 2 micro-batch(es))" in reference.stdout  # one dp rank: the two share each row
    killed = run(tmp_path / "b", "kill_at=5")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert [r["step"] for r in history(tmp_path / "b")] == [1, 2, 3, 4, 5]
    resumed = run(tmp_path / "b")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "label_tokens")
    expected = [[r.get(k) for k in keys] for r in history(tmp_path / "a")]
    assert len(expected) == 6
    assert [[r.get(k) for k in keys] for r in history(tmp_path / "b")] == expected
