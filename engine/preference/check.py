"""`packtune check` on preference pairs (train.objective = dpo, ipo, orpo or simpo): the first pairs
of the config's data, whole, `per_row` pairs to a row, in each layout the check compares:

    packed      packed rows, prompts shared when the model can (preference.shared_prompt)
    padded      the same pairs as padded batches (packed pairs == padded pairs)
    unshared    packed rows with each prompt packed once per response (shared == unshared prompts)

DPO and IPO read reference log-probs: the check's model as it starts (each layout's batches carry
the same ones, computed once from the unshared rows), as a run whose reference is the policy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from packtune.config import REFERENCE_OBJECTIVES, Config
from packtune.errors import DataError
from packtune.preference.loss import PreferenceLoss, shared_prompt_unsupported
from packtune.preference.packing import PackedPairRows, PaddedPairRows
from packtune.preference.rows import check_objective_fits_data


def check_pairs(cfg: Config, needed: int, longest: int):
    """The first `needed` pairs of the config's data whose sides hold at most `longest` tokens."""
    from packtune.data import prepare_dataset

    dataset = prepare_dataset(cfg.data, cfg.tokenizer)
    check_objective_fits_data(cfg, dataset)
    fits = np.flatnonzero(dataset.lengths.reshape(-1, 2).max(axis=1) <= longest)[:needed]
    if len(fits) < needed:
        raise DataError(f"packtune check needs {needed} preference pairs of at most {longest} tokens a side; "
                        f"the data has {len(fits)}")
    return dataset.subset(np.stack([2 * fits, 2 * fits + 1], axis=1).reshape(-1))


def pair_layouts(cfg: Config, model: torch.nn.Module, needed: int, longest: int
                 ) -> tuple[Callable[[str, int], list], dict[str, str], Callable[..., PreferenceLoss]]:
    """(batches(kind, pairs per row), {comparison: kind}, the loss module over a model) for run_check."""
    dataset = check_pairs(cfg, needed, longest)
    objective = cfg.train.objective
    shared = cfg.preference.shared_prompt and shared_prompt_unsupported(model) is None
    span = int(dataset.lengths.sum())
    n = len(dataset.prompt_lengths)

    def rows(kind: str, per_row: int):
        row_of = np.arange(n) // per_row
        if kind == "padded":
            return PaddedPairRows(dataset, row_of, span, False)
        return PackedPairRows(dataset, row_of, span, shared and kind == "packed")

    reference = None
    if objective in REFERENCE_OBJECTIVES:
        reference = np.zeros((n, 2))
        unshared = rows("unshared", 1)
        scorer = PreferenceLoss(model, objective, cfg.preference)
        with torch.no_grad():
            for r in range(len(unshared)):
                batch = unshared.collate(r)
                reference[batch.pairs] = scorer(batch.input_ids, batch.labels, batch.layout).double().numpy()

    def batches(kind: str, per_row: int) -> list:
        layout = rows(kind, per_row)
        layout.ref_logps = reference
        return [layout.collate(r) for r in range(len(layout))]

    kinds = {"packed pairs == padded pairs": "padded"}
    if shared:
        kinds["shared == unshared prompts"] = "unshared"
    return batches, kinds, lambda m: PreferenceLoss(m, objective, cfg.preference)
