"""`packtune eval` on preference pairs: how often a model prefers the chosen response.

The pairs are tokenized as training tokenizes them (the template, the prompt's ids shared by both
sides) and packed into rows of whole pairs; the model's label log-probs of each response (the fused
`linear_logprobs`) give two accuracies: the share of pairs whose chosen response has the higher
summed log-prob (the likelihood of the whole response), and the higher per-token average (length
normalised, SimPO's implicit reward). A tie counts as not preferring chosen, as TRL's
rewards/accuracies counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from packtune.config import DataConfig, PreferenceConfig
from packtune.datatools.jsonl_files import write_json
from packtune.errors import ConfigError
from packtune.preference.loss import PreferenceLoss, shared_prompt_unsupported
from packtune.preference.packing import PackedPairRows


@dataclass
class PreferenceAccuracy:
    pairs: int
    """Pairs scored (records read less those dropped, e.g. longer than data.max_tokens)."""
    records: int
    summed: float
    """Share of pairs with sum log p(chosen) > sum log p(rejected)."""
    average: float
    """Share of pairs with the chosen response's per-token average log-prob higher."""

    def summary(self) -> str:
        return (f"preference accuracy over {self.pairs} pairs ({self.records} records read): "
                f"{100 * self.summed:.1f}% by summed log-prob, {100 * self.average:.1f}% by per-token "
                "average")

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "records": self.records, "preference_accuracy_summed": self.summed,
                "preference_accuracy_average": self.average}


@torch.no_grad()
def pair_logps(model: torch.nn.Module, rows: PackedPairRows, device: torch.device
               ) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-probs, label-token counts), both float64 `[pairs, 2]` (chosen, rejected)."""
    scorer = PreferenceLoss(model, "simpo", PreferenceConfig())
    n = len(rows.dataset.prompt_lengths)
    logps, counts = np.zeros((n, 2)), np.zeros((n, 2))
    for r in range(len(rows)):
        batch = rows.collate(r)
        on_device = batch.to(device)
        out, tokens = scorer.logps(on_device.input_ids, on_device.labels, on_device.layout)
        logps[batch.pairs], counts[batch.pairs] = out.double().cpu().numpy(), tokens.double().cpu().numpy()
    return logps, counts


def run_preference_eval(model_dir: str | Path, data: str | Path, *, template: str = "auto", limit: int = 0,
                        json_out: str | Path | None = None, device: str | None = None,
                        dtype: str = "auto") -> PreferenceAccuracy:
    """Tokenize the pairs of `data` (the first `limit`; 0: all), score them with `model_dir`'s model."""
    from packtune.data import prepare_dataset
    from packtune.model.config import ModelArgs
    from packtune.model.families import family_for
    from packtune.model.loading import load_for_inference

    model_type = ModelArgs.from_file(model_dir).model_type
    if family_for(model_type).encoder_decoder:
        raise ConfigError(f"packtune eval {data}: preference pairs are scored by decoder-only models; "
                          f"{model_dir} is an encoder-decoder ({model_type})")
    dataset = prepare_dataset(DataConfig(path=str(data), template=template, num_workers=1), model_dir,
                              use_cache=False)
    if limit and limit < len(dataset.prompt_lengths):
        dataset = dataset.subset(np.arange(2 * limit))
    model = load_for_inference(model_dir, dtype, device)
    rows = PackedPairRows.packed(dataset, dataset.max_tokens, shared=shared_prompt_unsupported(model) is None)
    logps, counts = pair_logps(model, rows, next(model.parameters()).device)
    average = logps / np.maximum(counts, 1)
    result = PreferenceAccuracy(len(logps), dataset.report["rows"], float(np.mean(logps[:, 0] > logps[:, 1])),
                                float(np.mean(average[:, 0] > average[:, 1])))
    if json_out:
        write_json(json_out, {"model": str(model_dir), "data": str(data), "template": template,
                              **result.to_dict(), "logps": logps.tolist(), "label_tokens": counts.tolist()})
    return result
