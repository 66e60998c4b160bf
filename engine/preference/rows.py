"""A preference run's data stage: the tokenized pairs split into training and held-out pairs, packed
into rows of whole pairs (or padded, `data.packing = false`) and dealt to this rank by SFT's sampler;
the data report (with the pairs and the tokens prefix sharing saves) printed by rank 0."""

from __future__ import annotations

import numpy as np

from packtune.config import Config
from packtune.data.dataset import TokenizedDataset
from packtune.data.report import data_report, format_report
from packtune.data.rows import RunData
from packtune.data.sampler import PackedSampler
from packtune.errors import ConfigError
from packtune.parallel import DistContext
from packtune.preference.packing import PackedPairRows, PaddedPairRows


def check_objective_fits_data(cfg: Config, dataset: TokenizedDataset) -> None:
    """Preference records train with a preference objective, and only they do."""
    objective = cfg.train.objective
    if objective == "sft" and dataset.prompt_lengths is not None:
        raise ConfigError("the data holds preference records (chosen / rejected): set train.objective to "
                          "dpo, ipo, orpo or simpo")
    if objective != "sft" and dataset.prompt_lengths is None:
        raise ConfigError(f"train.objective = {objective!r} trains on preference records (prompt / chosen / "
                          f"rejected), but the data is in the {dataset.report.get('format', '?')} format")


def preference_run_data(cfg: Config, dist_ctx: DistContext, dataset: TokenizedDataset) -> RunData:
    """This rank's samplers over pairs, and the whole dataset (for the reference pass)."""
    check_objective_fits_data(cfg, dataset)
    n = len(dataset.prompt_lengths)
    train_pairs, eval_pairs = held_out_pairs(n, cfg.train.eval_fraction, cfg.train.seed)
    train_rows = build_pair_rows(cfg, dataset, train_pairs)
    if dist_ctx.is_main:
        split = "all pairs" if eval_pairs is None else f"training split ({len(train_pairs)} of {n} pairs)"
        report = pair_report(dataset, train_rows, dist_ctx.dp_size, cfg.train.micro_batches, split)
        print(format_report(report), flush=True)
        if eval_pairs is not None:
            print(f"  held out {len(eval_pairs)} pairs for evaluation", flush=True)
    deal = dict(seed=cfg.train.seed, rank=dist_ctx.dp_rank, world_size=dist_ctx.dp_size)
    sampler = PackedSampler(train_rows, micro_batches=cfg.train.micro_batches, **deal)
    eval_sampler = None
    if eval_pairs is not None:
        eval_sampler = PackedSampler(build_pair_rows(cfg, dataset, eval_pairs), micro_batches=1, **deal)
    return RunData(sampler, eval_sampler, dataset)


def build_pair_rows(cfg: Config, dataset: TokenizedDataset, pairs: np.ndarray):
    """Rows of the pairs `pairs` of `dataset`: packed (prompts shared per preference.shared_prompt)
    or padded, as data.packing says."""
    subset = dataset.subset(np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1))
    if cfg.data.packing:
        return PackedPairRows.packed(subset, dataset.max_tokens, cfg.preference.shared_prompt,
                                     cfg.data.packing_strategy, cfg.train.seed, pair_index=pairs)
    return PaddedPairRows.random_groups(subset, cfg.data.padded_batch_size, cfg.train.seed, pair_index=pairs)


def held_out_pairs(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training pairs, held-out pairs): a seeded random `fraction` of the pairs held out (None for 0)."""
    if fraction <= 0:
        return np.arange(n), None
    held = round(n * fraction)
    if not 1 <= held < n:
        raise ConfigError(f"train.eval_fraction = {fraction} holds out {held} of {n} pairs; it must leave at "
                          "least one pair on each side")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(perm[held:]), np.sort(perm[:held])


def pair_report(dataset: TokenizedDataset, rows, world_size: int, micro_batches: int, split: str) -> dict:
    """SFT's data report, its packing figures for pairs, with the pair count and prefix sharing's savings."""
    report = data_report(dataset, rows, world_size, micro_batches, split)
    packed = isinstance(rows, PackedPairRows)
    report["packing"] = ("packed pairs, prompts shared" if packed and rows.shared
                         else "packed pairs" if packed else "padded pairs")
    report["shared_prompt_tokens_saved"] = rows.shared_tokens_saved
    report["unshared_tokens"] = int(rows.row_tokens.sum()) + rows.shared_tokens_saved
    return report
