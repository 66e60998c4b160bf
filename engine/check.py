"""`packtune check CONFIG`: the loss semantics, verified on the user's own model and data.

A few optimizer steps of packtune's Trainer, three ways each, on the first samples of the
config's data (fp32, no checkpoints, in a temporary directory):

    packed == unpacked         the same samples as packed rows and as padded batches (an
                               encoder-decoder: each pair in a row of its own, both stacks)
    k micro-batches == 1 batch k micro-batches per step, and one micro-batch k times the size
    N ranks == 1 process       under torchrun: this run's ranks, and one process taking every
                               rank's micro-batches (skipped in a single process)
    cp=2 == cp=1               under torchrun with an even number of ranks: every row split in two
                               chunks over pairs of ranks (context parallelism), against whole rows

With a preference objective the items are pairs, whole in their rows, and "packed == unpacked"
becomes packed pairs == padded pairs, plus shared == unshared prompts (preference/check.py).

Each line prints the largest relative difference of the step losses and of the final weights,
and PASS when both are within `TOLERANCE`. By default the model is a shrunken copy of the
config's (2 layers, hidden 64, the same vocabulary and rope), randomly initialised, so the
check runs in seconds on a CPU; `--full` trains the real model.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from packtune.config import Config, TrainConfig
from packtune.context_parallel import init_context_parallel
from packtune.errors import ConfigError, DataError
from packtune.parallel import DistContext, init_distributed, shutdown

TOLERANCE = 1e-4
STEPS, MICRO_BATCHES, SAMPLES_PER_ROW, LONGEST = 3, 2, 3, 256
PAIRS_PER_ROW = 2


class FixedSteps:
    """A sampler over fixed steps (lists of micro-batches), one pass."""

    def __init__(self, steps: list[list]) -> None:
        self.steps, self.epoch, self.steps_taken = steps, 0, 0

    def __len__(self) -> int:
        return len(self.steps)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.steps_taken = epoch, 0

    def __iter__(self):
        while self.steps_taken < len(self.steps):
            self.steps_taken += 1
            yield self.steps[self.steps_taken - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "steps_taken": self.steps_taken}


def shrunken(args):
    """The config's architecture at toy size: 2 layers (an encoder-decoder: 2 per stack), hidden 64,
    4 heads of 16 (2 KV heads when the original uses GQA); vocabulary, rope, biases and tying unchanged."""
    kv = 4 if args.num_key_value_heads == args.num_attention_heads else 2
    stacks = {"num_decoder_layers": 2} if hasattr(args, "num_decoder_layers") else {}  # T5Args
    return dataclasses.replace(args, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=kv, head_dim=16, layer_types=(),
                               **stacks)


def check_model(cfg: Config, full: bool):
    """The config's model (`full`), or its shrunken copy, randomly initialised."""
    from packtune.model.families import build_model
    from packtune.model.hf_io import checkpoint_args, load_pretrained

    if full:
        return load_pretrained(cfg.model.path, dtype=torch.float32)
    model = build_model(shrunken(checkpoint_args(cfg.model.path)))
    model.init_weights(torch.Generator().manual_seed(cfg.train.seed))
    return model


def check_samples(cfg: Config, needed: int):
    """The first `needed` samples of the config's data of at most LONGEST tokens, as a dataset."""
    from packtune.data.rows import tokenized_data

    dataset = tokenized_data(cfg)
    index = np.flatnonzero(dataset.lengths <= LONGEST)[:needed]
    if len(index) < needed:
        raise DataError(f"packtune check needs {needed} samples of at most {LONGEST} tokens; the data has "
                        f"{len(index)}")
    return dataset.subset(index)


def batches(rows_cls, dataset, per_row: int, weighting: str, **pairs) -> list:
    """Every consecutive `per_row` samples as one batch (packed row or padded batch; `pairs`: PairRows'
    keywords, an encoder-decoder's rows of pairs)."""
    row_of = np.arange(len(dataset)) // per_row
    if pairs:
        pairs = {"max_target_tokens": int(dataset.label_counts.sum()), **pairs}
    rows = rows_cls(dataset, row_of, int(dataset.lengths.sum()), weighting, **pairs)
    return [rows.collate(r) for r in range(len(rows))]


def train(
    cfg: TrainConfig, model, steps: list[list], dist_ctx: DistContext, wrap: Callable | None = None
) -> tuple[list[float], torch.Tensor]:
    """(step losses, final flat weights) of packtune's Trainer on fixed steps; `wrap` gives the loss
    module over the model (default: the SFT loss)."""
    from packtune.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = dataclasses.replace(cfg, output_dir=tmp, max_steps=len(steps), save_every=0, eval_every=0,
                                      log_every=1, compile=False)
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(model)
        trainer = Trainer(run_cfg, model, FixedSteps(steps), dist_ctx, log_stream=io.StringIO(),
                          mixed_precision=False, loss_module=wrap(model) if wrap else None)
        trainer.fit()
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines() if dist_ctx.is_main else []
    import json

    losses = [json.loads(line)["loss"] for line in lines]
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards gathered
    weights = torch.cat([full(p.detach()).flatten() for p in trainer.model.parameters()])
    return losses, weights.cpu()


def relative(a: tuple[list[float], torch.Tensor], b: tuple[list[float], torch.Tensor]) -> tuple[float, float]:
    loss = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[0], b[0], strict=True)), default=0.0)
    weights = float((a[1] - b[1]).norm() / b[1].norm().clamp(min=1e-12))
    return loss, weights


def report(name: str, diffs: tuple[float, float] | str | None) -> bool:
    """Print one comparison: its differences, or SKIP with why (`diffs` a reason, or None: too few ranks)."""
    if not isinstance(diffs, tuple):
        ranks = "an even number of ranks" if name.startswith("cp=") else "more than one rank"
        print(f"  {name:<28} SKIP ({diffs or f'run under torchrun with {ranks}'})", flush=True)
        return True
    ok = max(diffs) <= TOLERANCE
    print(f"  {name:<28} loss rel diff {diffs[0]:.2e}  weights rel diff {diffs[1]:.2e}  "
          f"{'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def context_parallel_check(cfg: Config, model, base, packed: list, dist_ctx: DistContext
                           ) -> tuple[float, float] | str:
    """The differences of the same steps with every row split over 2 ranks (rank pairs sharing
    rows: each of the world / 2 dp ranks takes 2k of a step's world x k rows), or why not."""
    from packtune.context_parallel import check_model as check_context_model

    try:
        check_context_model(model, 2)
    except ConfigError as e:
        return str(e)
    world, k = dist_ctx.world_size, MICRO_BATCHES
    cp = dataclasses.replace(dist_ctx, context=init_context_parallel(dist_ctx.device.type, world,
                                                                    dist_ctx.rank, 2))
    steps = [packed[s * world * k + cp.dp_rank * 2 * k:][:2 * k] for s in range(STEPS)]
    return relative(base, train(cfg.train, model, steps, cp))


def run_check(cfg: Config, full: bool = False) -> bool:
    """Run the comparisons, print them (rank 0); True when all pass."""
    from packtune.data.packing import PackedRows, PaddedRows
    from packtune.data.pair_rows import PairRows
    from packtune.data.rows import seq2seq_args

    dist_ctx = init_distributed(cfg.train.device)
    try:
        world, k, per_row = dist_ctx.world_size, MICRO_BATCHES, SAMPLES_PER_ROW
        weighting = cfg.train.loss_weighting
        needed = STEPS * world * k * per_row
        seq2seq = seq2seq_args(cfg)  # refuses a preference objective on an encoder-decoder
        model = check_model(cfg, full)
        wrap = None
        if cfg.train.objective != "sft":
            from packtune.preference.check import pair_layouts

            per_row = PAIRS_PER_ROW
            make, kinds, wrap = pair_layouts(cfg, model, STEPS * world * k * per_row, LONGEST)
        elif seq2seq is None:
            dataset = check_samples(cfg, needed)
            kinds = {"packed == unpacked": "padded"}

            def make(kind: str, size: int) -> list:
                return batches(PaddedRows if kind == "padded" else PackedRows, dataset, size, weighting)
        else:  # unpacked: each pair in a row of its own, the step's pairs in per_row x more micro-batches
            dataset = check_samples(cfg, needed)
            kinds = {"packed == unpacked": "single"}
            start = {"decoder_start_token_id": seq2seq.decoder_start_token_id}

            def make(kind: str, size: int) -> list:
                return batches(PairRows, dataset, 1 if kind == "single" else size, weighting, **start)
        packed = make("packed", per_row)
        bigger = make("packed", per_row * k)
        group = world * k

        def mine(rows: list) -> list[list]:  # this rank's micro-batches of each step (rows split evenly)
            size = len(rows) // (STEPS * world)
            return [rows[s * world * size + dist_ctx.rank * size:][:size] for s in range(STEPS)]

        if dist_ctx.is_main:
            what = "the model" if full else "a shrunken copy of the model"
            items = "samples" if wrap is None else f"{cfg.train.objective} pairs"
            print(f"packtune check: {STEPS} steps x {world} rank(s) x {k} micro-batches of {per_row} "
                  f"{items}, {what}, fp32", flush=True)
        base = train(cfg.train, model, mine(packed), dist_ctx, wrap)
        results = {name: relative(base, train(cfg.train, model, mine(make(kind, per_row)), dist_ctx, wrap))
                   for name, kind in kinds.items()}
        results[f"{k} micro-batches == 1 batch"] = relative(base, train(cfg.train, model, mine(bigger),
                                                                         dist_ctx, wrap))
        results[f"{world} ranks == 1 process"] = None
        results["cp=2 == cp=1"] = None if wrap is None else "context parallelism splits no preference pairs"
        if world % 2 == 0 and wrap is None:  # pairs of ranks share each row, each dp rank takes 2k rows
            results["cp=2 == cp=1"] = context_parallel_check(cfg, model, base, packed, dist_ctx)
        if world > 1 and dist_ctx.is_main:  # no collectives: rank 0 alone runs the one-process reference
            alone = DistContext(0, 1, 0, dist_ctx.device, None)
            steps = [packed[s * group : (s + 1) * group] for s in range(STEPS)]
            one_process = train(cfg.train, model, steps, alone, wrap)
            results[f"{world} ranks == 1 process"] = relative(base, one_process)
        ok = True
        if dist_ctx.is_main:
            for name, diffs in results.items():
                ok &= report(name, diffs)
            print("packtune check: " + ("PASS" if ok else "FAIL"), flush=True)
        return ok
    finally:
        shutdown(dist_ctx)
