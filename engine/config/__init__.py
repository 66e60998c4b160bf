"""A run's configuration: one dataclass per TOML section, each checking its own keys (`check()`),
and `Config`, the sections together, which adds the checks that span sections.

    [model]  model.py   which checkpoint trains, in which dtype
    [data]   data.py    what trains, how it is rendered, tokenized and packed
    [train]  train.py   the optimizer, schedule, cadence and output directory
    [lora]   lora.py    LoRA / QLoRA adapters on a frozen base
    [preference]  preference.py  DPO / IPO / ORPO / SimPO settings (`[train] objective`)
    toml.py             reading a TOML file and `--set` overrides, writing one back
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from packtune.config.data import DataConfig, DataSource
from packtune.config.lora import EXPORT_MODES, LoRAConfig
from packtune.config.model import ModelConfig
from packtune.config.preference import REFERENCE_OBJECTIVES, PreferenceConfig
from packtune.config.toml import RENAMED_KEYS, dump_config, load_config, suggest
from packtune.config.train import LOSS_WEIGHTINGS, TrainConfig
from packtune.errors import ConfigError

__all__ = ["Config", "DataConfig", "DataSource", "LoRAConfig", "ModelConfig", "PreferenceConfig",
           "TrainConfig", "RENAMED_KEYS", "LOSS_WEIGHTINGS", "REFERENCE_OBJECTIVES", "dump_config",
           "load_config", "suggest"]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @property
    def tokenizer(self) -> str:
        """What the run tokenizes with: data.tokenizer, else the model directory's."""
        return self.data.tokenizer or self.model.path

    def check(self) -> None:
        """Every key of every section, then what spans sections; raises ConfigError (ModelError for
        a model packtune cannot reproduce) before anything is read at length or written."""
        self.train.check()
        self.data.check(self.tokenizer)
        self.model.check()
        self.lora.check()
        self.check_export()
        if self.train.context_parallel > 1 and not self.data.packing:
            raise ConfigError(f"train.context_parallel = {self.train.context_parallel} splits packed rows: "
                              "it needs data.packing = true")
        self.check_objective()
        if self.lora.enabled and self.lora.init_from:
            from packtune.lora.training import check_init_from

            check_init_from(self.lora)

    def check_objective(self) -> None:
        """A preference objective: its [preference] keys, and the token weighting its pairs use."""
        objective = self.train.objective
        if objective == "sft":
            return
        self.preference.check(objective)
        if self.train.context_parallel > 1:
            raise ConfigError(f"train.context_parallel = {self.train.context_parallel} splits rows across "
                              f"ranks; train.objective = {objective!r} keeps each pair whole in one rank's "
                              "row (leave it 1)")
        if self.train.loss_weighting != "token":
            raise ConfigError(f"train.loss_weighting = {self.train.loss_weighting!r} is for SFT; "
                              f"train.objective = {objective!r} averages its terms over the step's pairs "
                              "(leave it \"token\")")

    def check_export(self) -> None:
        """`train.export` as the kind of run allows: a LoRA run may name what it writes."""
        export = self.train.export
        if not self.lora.enabled and isinstance(export, str):
            raise ConfigError(f"train.export = {export!r} needs a LoRA run ([lora] rank > 0); a full "
                              "fine-tuning run takes true or false")
        if self.lora.enabled and isinstance(export, str) and export not in EXPORT_MODES:
            raise ConfigError(f"train.export must be true, false or one of {', '.join(EXPORT_MODES)}, "
                              f"got {export!r}")
