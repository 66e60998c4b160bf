"""The run's data stage: the tokenized dataset split into training and held-out samples, built into
rows (packed, or padded for comparison) and dealt to this rank by samplers; the data report is
printed by rank 0 before step 1. Under context parallelism (`[train] context_parallel = N`) rows
and samples hold up to data.max_tokens x N tokens and are dealt to the dp ranks, each row's N ranks
receiving it whole (the Trainer keeps each rank's chunk)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from packtune.config import Config
from packtune.data.dataset import TokenizedDataset, prepare_dataset
from packtune.data.report import data_report, format_report
from packtune.data.sampler import PackedSampler
from packtune.errors import ConfigError
from packtune.parallel import DistContext


@dataclass
class RunData:
    """This rank's samplers: training, and the held-out split's (None without train.eval_fraction)."""

    sampler: PackedSampler
    eval_sampler: PackedSampler | None
    dataset: TokenizedDataset | None = None
    """Preference runs: the whole tokenized data, whose pairs the reference pass scores."""


def prepare_run_data(cfg: Config, dist_ctx: DistContext) -> RunData:
    """Tokenize (one rank per node fills the cache, the others then read it), hold out, build rows."""
    if dist_ctx.local_rank == 0:
        dataset = tokenized_data(cfg)
    dist_ctx.barrier()
    if dist_ctx.local_rank != 0:
        dataset = tokenized_data(cfg)
    if cfg.train.objective != "sft" or dataset.prompt_lengths is not None:
        from packtune.preference.rows import preference_run_data

        return preference_run_data(cfg, dist_ctx, dataset)
    train_set, eval_set = held_out_split(dataset, cfg.train.eval_fraction, cfg.train.seed)
    rows = build_rows(cfg, train_set)
    if dist_ctx.is_main:
        split = ("all samples" if eval_set is None
                 else f"training split ({len(train_set)} of {len(dataset)} samples)")
        report = data_report(train_set, rows, dist_ctx.dp_size, cfg.train.micro_batches, split,
                             context_parallel=cfg.train.context_parallel)
        print(format_report(report), flush=True)
        if eval_set is not None:
            print(f"  held out {len(eval_set)} samples for evaluation", flush=True)
    deal = dict(seed=cfg.train.seed, rank=dist_ctx.dp_rank, world_size=dist_ctx.dp_size)
    sampler = PackedSampler(rows, micro_batches=cfg.train.micro_batches, **deal)
    if eval_set is None:
        return RunData(sampler, None)
    return RunData(sampler, PackedSampler(build_rows(cfg, eval_set), micro_batches=1, **deal))


def row_data_config(cfg: Config):
    """`[data]` as the rows are built: under context parallelism a row (and a sample) holds up to
    data.max_tokens x train.context_parallel tokens, every rank computing a chunk of data.max_tokens."""
    if cfg.train.context_parallel == 1:
        return cfg.data
    return replace(cfg.data, max_tokens=cfg.data.max_tokens * cfg.train.context_parallel)


def seq2seq_args(cfg: Config):
    """The model's args when it is an encoder-decoder (T5: the run's data are then (input, target)
    pairs, data/pairs.py), else None."""
    from packtune.model.config import ModelArgs
    from packtune.model.families import family_for

    if not cfg.model.path:
        return None
    args = ModelArgs.from_file(cfg.model.path)
    if not family_for(args.model_type).encoder_decoder:
        return None
    if cfg.train.objective != "sft":
        raise ConfigError(preference_refusal(cfg.train.objective, args.model_type))
    return args


def preference_refusal(objective: str, model_type: str) -> str:
    """Why a preference objective does not train an encoder-decoder (one line, for either side to raise)."""
    return (f"train.objective = {objective!r}: preference objectives train decoder-only models, not an "
            f"encoder-decoder ({model_type}); train it with objective = \"sft\" on (input, target) pairs")


def tokenized_data(cfg: Config) -> TokenizedDataset:
    """The run's data, tokenized once (cached): samples, or pairs for an encoder-decoder."""
    return prepare_dataset(row_data_config(cfg), cfg.tokenizer, pairs=seq2seq_args(cfg) is not None)


def build_rows(cfg: Config, dataset: TokenizedDataset):
    """The dataset's rows as the config asks: packed (by data.packing_strategy) or padded, their
    batches weighted by train.loss_weighting; pairs of an encoder-decoder packed on both sides."""
    weighting = cfg.train.loss_weighting
    seq2seq = seq2seq_args(cfg)
    if seq2seq is not None:
        from packtune.data.pair_rows import PairRows

        if not cfg.data.packing:
            raise ConfigError("data.packing = false: an encoder-decoder trains on packed rows of pairs only "
                              "(a row of one pair is its unpacked form; `packtune check` compares the two)")
        return PairRows.packed(dataset, dataset.max_tokens, cfg.data.max_target_tokens,
                               seq2seq.decoder_start_token_id, cfg.data.packing_strategy, cfg.train.seed,
                               weighting)
    if cfg.data.packing:
        return dataset.pack(strategy=cfg.data.packing_strategy, seed=cfg.train.seed, loss_weighting=weighting)
    return dataset.pad(cfg.data.padded_batch_size, cfg.train.seed, loss_weighting=weighting)


def held_out_split(dataset: TokenizedDataset, fraction: float, seed: int
                   ) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """(train, held-out): a seeded random `fraction` of the samples held out (None for 0)."""
    if fraction <= 0:
        return dataset, None
    n = len(dataset)
    held = round(n * fraction)
    if not 1 <= held < n:
        raise ConfigError(f"train.eval_fraction = {fraction} holds out {held} of {n} samples; "
                          "it must leave at least one sample on each side")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return dataset.subset(np.sort(perm[held:])), dataset.subset(np.sort(perm[:held]))
