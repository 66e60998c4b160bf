"""`[preference]`: the settings of the preference objectives (`[train] objective` = dpo, ipo, orpo or
simpo; see packtune.preference). Ignored by SFT runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from packtune.errors import ConfigError

REFERENCE_OBJECTIVES = ("dpo", "ipo")
"""The objectives that compare the policy with a reference model (ORPO and SimPO need none)."""


@dataclass
class PreferenceConfig:
    beta: float = 0.1
    """DPO / IPO / SimPO temperature: DPO's beta, IPO's tau (the target margin is 1 / (2 beta)),
    SimPO's reward scale."""
    label_smoothing: float = 0.0
    """DPO only: the assumed share of flipped labels (conservative DPO), in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    orpo_lambda: float = 0.1
    """ORPO's weight lambda of the odds-ratio term against the NLL of the chosen responses."""
    ref_model: str = ""
    """DPO / IPO: the reference model directory; empty: the policy as the run starts (with LoRA: the
    base with the adapters it starts from)."""
    sft_weight: float = 0.0
    """An added NLL term on the chosen responses (RPO's alpha; CPO's BC term): this weight times their
    mean token loss over the step. ORPO has its own (weight 1); this one adds to it."""
    shared_prompt: bool = True
    """Pack a pair's prompt once, both responses attending to it (prefix sharing); false packs the
    prompt twice, once before each response."""

    def check(self, objective: str) -> None:
        """The keys the objective reads; `ref_model` must be a model directory."""
        finite = {k: getattr(self, k) for k in ("beta", "label_smoothing", "simpo_gamma", "orpo_lambda",
                                                 "sft_weight")}
        for key, value in finite.items():
            if not math.isfinite(value):
                raise ConfigError(f"preference.{key} must be a finite number, got {value!r}")
        if self.beta <= 0:
            raise ConfigError(f"preference.beta must be > 0, got {self.beta!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and objective != "dpo":
            raise ConfigError(f"preference.label_smoothing is DPO's (conservative DPO); train.objective is "
                              f"{objective!r}")
        if self.orpo_lambda < 0 or self.sft_weight < 0:
            key = "orpo_lambda" if self.orpo_lambda < 0 else "sft_weight"
            raise ConfigError(f"preference.{key} must be >= 0, got {getattr(self, key)!r}")
        if self.ref_model and objective not in REFERENCE_OBJECTIVES:
            raise ConfigError(f"preference.ref_model: train.objective = {objective!r} is reference-free "
                              f"(only {' and '.join(REFERENCE_OBJECTIVES)} read a reference model)")
        if self.ref_model and not (Path(self.ref_model) / "config.json").is_file():
            raise ConfigError(f"preference.ref_model: {self.ref_model} has no config.json (not a Hugging "
                              "Face model directory)")
