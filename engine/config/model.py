"""`[model]`: which checkpoint trains, and in which dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packtune.errors import ConfigError, ModelError


@dataclass
class ModelConfig:
    path: str = ""
    """A Hugging Face model directory (config.json + safetensors)."""
    dtype: str = "auto"
    """Compute dtype over fp32 master weights: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16
    (also on CPU); float16 is refused (no loss scaling). The export is written in this dtype (auto:
    the source checkpoint's)."""

    def check(self) -> None:
        from packtune.model.config import ModelArgs
        from packtune.precision import DTYPES

        if not self.path:
            raise ConfigError("model.path is required (a Hugging Face model directory)")
        if not (Path(self.path) / "config.json").is_file():
            raise ConfigError(f"model.path: {self.path} has no config.json (not a Hugging Face directory)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "float16":
            raise ConfigError("model.dtype = 'float16' cannot train here: fp16 gradients need loss "
                              "scaling, which packtune does not do; use 'bfloat16' (bf16 compute, fp32 "
                              "master weights)")
        try:  # the family's parse: an unsupported model is reported before the data is tokenized
            ModelArgs.from_file(self.path)
        except ModelError as e:
            raise ModelError(f"model.path: {e}") from None
