"""`[data]` and its `[[data.sources]]` tables: what trains, how it is rendered, tokenized and packed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from packtune.errors import ConfigError


@dataclass
class DataSource:
    """One `[[data.sources]]` table: a data file mixed into the run with a weight."""

    path: str = ""
    """A data file (JSONL, JSON, CSV, Parquet, Arrow; .gz/.zst) or a `datasets.save_to_disk` folder."""
    format: str | None = None
    """The record layout, as data.format; unset: data.format."""
    field_map: list[str] | None = None
    """Field renames, as data.field_map; unset: data.field_map."""
    weight: float = 1.0
    """Mixing weight w > 0: int(w) copies of every record plus a seeded random w - int(w) share of them."""


@dataclass
class DataConfig:
    path: str = ""
    """A file of training records (JSONL, JSON, CSV, Parquet, Arrow; .gz/.zst) or a save_to_disk folder."""
    format: str = "auto"
    """auto, alpaca, sharegpt, messages, prompt_completion or text."""
    template: str = "auto"
    """auto: the tokenizer folder's chat template (auto:NAME a named one), alpaca when it has none;
    or a built-in (alpaca, vicuna_v1.1, chatml, llama2, llama3, raw), or a .toml template file."""
    rewritten_history: str = "error"
    """For chat templates that render earlier turns differently once later ones exist (Qwen3 drops
    past reasoning): error, as_rendered (train each turn as the whole conversation renders it) or
    split (one sample per assistant turn, the conversation up to it)."""
    tokenizer: str = ""
    """A sentencepiece .model or tokenizer.json; default: the model directory's."""
    max_tokens: int = 2048
    """Tokens per packed row; also the longest sample kept."""
    max_target_tokens: int = 0
    """Encoder-decoders (T5): the longest target kept, and the decoder's tokens per packed row (whose
    encoder side holds max_tokens); 0: targets up to max_tokens, rows sized from the data so that
    both sides fill alike (data/pair_rows.py)."""
    skip_bad_records: bool = False
    """Skip (and count) malformed records instead of stopping at the first one."""
    train_on: str = "assistant"
    """Trained tokens: assistant (every answer and its end token), last (the last answer only), all."""
    truncation: str = "drop"
    """Samples longer than max_tokens: drop, or truncate (cut the end of the response)."""
    field_map: list[str] = field(default_factory=list)
    """Field renames for the input records, canonical=actual: ["instruction=question", "output=answer"]."""
    cache_dir: str = ""
    """Tokenize-once cache folder; default $PACKTUNE_CACHE or ~/.cache/packtune/data."""
    num_workers: int = 0
    """Tokenizer worker processes; 0 means one per CPU core (at most 8)."""
    packing: bool = True
    """Pack samples into rows of max_tokens; false gives padded batches."""
    packing_strategy: str = "bfd"
    """bfd: best-fit decreasing, the densest rows, but a row holds samples of similar length (and
    so, in data where length tells the kind of sample, of one kind). shuffle: samples in a seeded
    random order, each into the fullest of 16 open rows with room: every row mixes lengths, a
    little less dense (the data report shows the packing efficiency)."""
    padded_batch_size: int = 8
    """Samples per padded micro-batch when packing = false."""
    sources: list[DataSource] = field(default_factory=list)
    """Several data files in one run (`[[data.sources]]` tables), instead of `path`."""
    mix_seed: int = 0
    """Seeds the random share of records taken from sources with a fractional weight."""

    def sources_given(self) -> list[tuple[str, DataSource]]:
        """(config key, source) of every data file: `data.path` as one source, or the tables."""
        if self.path:
            return [("data", DataSource(self.path))]
        return [(f"data.sources[{i}]", s) for i, s in enumerate(self.sources)]

    def check(self, tokenizer: str = "") -> None:
        """Every [data] key; `tokenizer` is what the run tokenizes with (data.tokenizer or the model
        directory). The data pipeline calls this at its entry, `packtune train` before anything else."""
        from packtune.data.builtin_templates import TRAIN_ON, get_template
        from packtune.data.chat_format import auto_variant
        from packtune.data.formats import FORMATS, field_names
        from packtune.data.jinja_template import REWRITTEN_HISTORY
        from packtune.data.packing import PACKING_STRATEGIES

        if self.path and self.sources:
            raise ConfigError(
                "data.path and [[data.sources]] are both set: give the path as a source instead")
        if not self.path and not self.sources:
            raise ConfigError(
                "data.path is not set: give a data file (JSONL, JSON, CSV, Parquet, Arrow) or "
                "[[data.sources]]")
        for key, source in self.sources_given():
            if not source.path:
                raise ConfigError(f"{key}.path is not set")
            fmt = self.format if source.format is None else source.format
            if fmt not in ("auto", *FORMATS):
                raise ConfigError(f"{key}.format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
            if not (math.isfinite(source.weight) and source.weight > 0):
                raise ConfigError(f"{key}.weight: must be a number > 0, got {source.weight!r}")
            field_names(self.field_map if source.field_map is None else source.field_map)
            if not Path(source.path).exists():
                raise ConfigError(f"{key}.path: {source.path} does not exist")
        if not (tokenizer or self.tokenizer):
            raise ConfigError("no tokenizer: set data.tokenizer (a .model or tokenizer.json) or model.path")
        for key, value, valid in (
            ("format", self.format, ("auto", *FORMATS)),
            ("train_on", self.train_on, TRAIN_ON),
            ("truncation", self.truncation, ("drop", "truncate")),
            ("rewritten_history", self.rewritten_history, REWRITTEN_HISTORY),
            ("packing_strategy", self.packing_strategy, PACKING_STRATEGIES),
        ):
            if value not in valid:
                raise ConfigError(f"data.{key}: {value!r} is not one of {', '.join(valid)}")
        if self.max_tokens < 2:
            raise ConfigError(f"data.max_tokens: must be at least 2, got {self.max_tokens}")
        if self.max_target_tokens and self.max_target_tokens < 2:
            raise ConfigError(f"data.max_target_tokens: must be 0 (auto) or at least 2, got "
                              f"{self.max_target_tokens}")
        if self.padded_batch_size < 1:
            raise ConfigError(f"data.padded_batch_size: must be at least 1, got {self.padded_batch_size}")
        if auto_variant(self.template) is None:
            get_template(self.template)
        field_names(self.field_map)
