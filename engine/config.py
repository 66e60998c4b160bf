"""Typed run configuration: a TOML file plus `--set section.key=value` overrides.

Unknown sections or keys and values of the wrong type are errors that name the key and suggest
the closest valid one, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packtune.errors import ConfigError


@dataclass
class ModelConfig:
    path: str = ""
    """A Hugging Face model directory (config.json + safetensors)."""
    dtype: str = "auto"
    """Compute dtype over fp32 master weights: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16
    (also on CPU); float16 is refused (no loss scaling). The export is written in this dtype (auto:
    the source checkpoint's)."""


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


@dataclass
class TrainConfig:
    output_dir: str = "runs/packtune"
    """Where metrics.jsonl, config.toml, checkpoints/ and the exported final/ model go."""
    max_steps: int = 0
    """Optimizer steps; 0 means run `epochs` full epochs."""
    epochs: int = 1
    """Passes over the training data (when max_steps is 0)."""
    micro_batches: int = 1
    """Gradient accumulation: packed rows per optimizer step (per rank)."""
    lr: float = 2e-5
    """Peak learning rate (AdamW), reached after warmup, then cosine decay."""
    warmup: float = 0.03
    """Warmup length: a fraction of the total steps if < 1, else a number of steps."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only when stopped by a signal)."""
    log_every: int = 1
    """Print the progress line and write metrics every this many steps (one host sync each)."""
    seed: int = 0
    """Seeds the data order, the held-out split and torch's RNG."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any), never, or a checkpoint path."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0 keeps all)."""
    eval_every: int = 0
    """Evaluate the held-out split every this many steps and at the end (0: never)."""
    eval_fraction: float = 0.0
    """Fraction of the samples (seeded random) held out of training for evaluation."""
    eval_data: str = ""
    """Instruction records (any data layout) the model answers greedily every eval_generate_every steps
    and at the end, scored as `packtune eval` scores them (exact match, ROUGE-L, ...) into metrics.jsonl."""
    eval_generate_every: int = 0
    """Steps between eval_data evaluations (0: only at the end, when eval_data is set)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    min_lr_ratio: float = 0.0
    """The cosine decays to lr * min_lr_ratio."""
    loss_weighting: str = "token"
    """How token losses are averaged over the optimizer step: token (every label token counts
    equally), sample (every sample counts equally: its token losses are averaged, then the step
    averages over samples) or turn (likewise per assistant turn, a contiguous run of trained tokens)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: measure only)."""
    max_bad_steps: int = 5
    """Abort after this many optimizer steps in a row with a non-finite loss or grad norm (0: never)."""
    device: str = "auto"
    """auto (this rank's GPU if CUDA is available, else CPU), cpu or cuda."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in the backward pass instead of storing its activations."""
    compile: bool = False
    """torch.compile each decoder block."""
    export: bool | str = True
    """Write the final model: true writes `<output_dir>/final` (a Hugging Face model directory; with
    [lora] a PEFT adapter), false nothing. LoRA runs also take "adapter" (final/), "merged" (the
    merged model in Hugging Face format, final-merged/) or "both"."""
    overwrite: bool = False
    """Start a new run even if output_dir holds a run (finished or not) or other files: they are
    first moved aside to `<output_dir>.replaced-<time>`, never deleted (also `--overwrite`)."""
    report_to: list[str] = field(default_factory=list)
    """Also send the metrics to: tensorboard, wandb (offline without WANDB_API_KEY)."""
    progress: str = "auto"
    """auto (a bar with ETA on a terminal, else one line per log_every steps), bar, line or none
    (also `--quiet`)."""


@dataclass
class LoRAConfig:
    """LoRA / QLoRA: train low-rank adapters on a frozen base (see packtune.lora)."""

    rank: int = 0
    """Adapter rank r; 0 (or no [lora] table): full fine-tuning."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapters' input only, in [0, 1)."""
    targets: str | list[str] = "all-linear"
    """all-linear (every linear of the decoder blocks), or a list of the family's projection names:
    q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (Llama, Mistral, Qwen, Gemma);
    qkv_proj, o_proj, gate_up_proj, down_proj (Phi-3); query_key_value, dense, dense_h_to_4h,
    dense_4h_to_h (BLOOM)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank)."""
    base_dtype: str = "auto"
    """The frozen base's storage: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, or nf4 (QLoRA:
    4-bit NormalFloat through torchao, the `qlora` extra)."""
    init_from: str = ""
    """A PEFT adapter directory to continue training from (its rank, alpha and targets must match)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


RENAMED_KEYS = {"data.skip_bad_rows": "data.skip_bad_records"}
"""Old key -> its new name. The old name still works and warns once per process."""
_warned_renames: set[str] = set()


def _renamed(section: str, key: str, source: str) -> str:
    """`key`, or its new name (with a FutureWarning the first time) when it was renamed."""
    new = RENAMED_KEYS.get(f"{section}.{key}")
    if new is None:
        return key
    if f"{section}.{key}" not in _warned_renames:
        _warned_renames.add(f"{section}.{key}")
        warnings.warn(f"{source}: {section}.{key} is now called {new}; the old name will stop working "
                      "in a later release", FutureWarning, stacklevel=4)
    return new.partition(".")[2]


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(choices))}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif annotation in (str, bool) and type(value) is annotation:
        return value
    elif origin is list and isinstance(value, list):
        (item,) = typing.get_args(annotation)
        if dataclasses.is_dataclass(item):
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return [_coerce(v, item, where) for v in value]
    elif dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return _build(annotation, value, where)
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """A dataclass from a TOML table, each key checked like a section's keys."""
    keys = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, list(keys))}")
        values[key] = _coerce(value, keys[key], f"{where}.{key}")
    return cls(**values)


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = typing.get_type_hints(Config)
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}]{_suggest(section, list(sections))}")
    obj = getattr(cfg, section)
    keys = typing.get_type_hints(type(obj))
    key = _renamed(section, key, source)
    if key not in keys:
        raise ConfigError(f"{source}: unknown key {section}.{key}{_suggest(key, list(keys))}")
    setattr(obj, key, _coerce(value, keys[key], f"{source}: {section}.{key}"))


def _parse_override_value(text: str) -> Any:
    """`--set` values are TOML literals (1e-5, true, "x", [1, 2]); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (defaults when `path` is None), then apply `section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for item in overrides:
        dotted, sep, text = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _apply(cfg, section, key, _parse_override_value(text.strip()), "--set")
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as TOML, saved beside a run so it can be repeated exactly."""
    lines = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        tables = {k: v for k, v in table.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        lines += [f"{k} = {_toml_literal(v)}" for k, v in table.items() if v is not None and k not in tables]
        for key, items in tables.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines += [f"{k} = {_toml_literal(v)}" for k, v in item.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
