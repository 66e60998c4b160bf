"""`[train]`: the optimizer, the schedule, the loop's cadence, where the run is written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from packtune.errors import ConfigError

LOSS_WEIGHTINGS = ("token", "sample", "turn")
"""How token losses are averaged over a step (see TrainConfig.loss_weighting)."""
PROGRESS = ("auto", "bar", "line", "none")
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo")
"""What a run optimises: supervised fine-tuning, or a preference objective ([preference])."""
ON_SAVE_ERROR = ("stop", "continue")
DEVICES = ("auto", "cpu", "cuda")

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
    objective: str = "sft"
    """sft (next-token loss on the trained tokens), or a preference objective on prompt / chosen /
    rejected records: dpo, ipo, orpo or simpo (settings in [preference]; docs/preference.md)."""
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
    """How many of the newest checkpoints to keep (0 keeps all); the newest one that verifies is never
    deleted before a newer one has verified."""
    on_save_error: str = "stop"
    """A checkpoint that cannot be written (disk full, no permission, I/O error; its partial files are
    removed, the earlier checkpoints kept): stop with one line saying what to free or change, or
    continue training and try again at the next save."""
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
    router_aux_loss: bool | float = True
    """Mixture-of-experts models: add the routers' load-balancing loss (transformers'
    `load_balancing_loss_func`, over each micro-batch's real tokens; the step adds the mean over its
    micro-batches) times a coefficient: true takes the model's `router_aux_loss_coef` (config.json),
    a number replaces it, false leaves the loss out. Dense models ignore it."""
    router_z_loss: float = 0.0
    """Mixture-of-experts models: the coefficient of the router z-loss (ST-MoE: the mean over tokens
    and sparse layers of logsumexp(router logits) ** 2); 0: none."""
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
    tiled_mlp: bool | int | str = False
    """Run each decoder block's MLP over tiles of this many tokens, each recomputed alone in the backward
    (packtune.tiled_mlp): its live memory is O(tile x intermediate) instead of O(row x intermediate),
    for the cost of one more MLP forward. "auto": tiles of the largest power of two of tokens whose
    fp32 [tile x intermediate] activation fits 32 MiB (4096 tokens for an intermediate size of 1536);
    false: none. Rows no longer than a tile run untiled."""
    offload_activations: bool = False
    """Keep what the forward saves outside the checkpointed blocks (each block's input) in pinned host
    memory until the backward brings it back, double-buffered on a side stream (packtune.offload);
    needs activation_checkpointing."""
    context_parallel: int = 1
    """Split each packed row into this many contiguous chunks over as many ranks, attention exchanged
    Ulysses-style (packtune.context_parallel): rows and samples hold up to data.max_tokens x this many
    tokens, each rank computing data.max_tokens. The number of ranks must be a multiple of it."""
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

    def check(self) -> None:
        """Every [train] key: ranges, choices, the resume path, the reporters' packages, and that
        output_dir can be written (checked without writing anything)."""
        import torch

        from packtune.reporters import check_reporters

        for key in ("lr", "micro_batches", "log_every", "context_parallel"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("max_steps", "warmup", "save_every", "eval_every", "keep_checkpoints", "weight_decay",
                    "max_grad_norm", "max_bad_steps", "min_lr_ratio", "eval_generate_every",
                    "router_aux_loss", "router_z_loss"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"train.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("train.epochs must be > 0 when train.max_steps is 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        for key, choices in (("device", DEVICES), ("progress", PROGRESS), ("objective", OBJECTIVES),
                             ("loss_weighting", LOSS_WEIGHTINGS), ("on_save_error", ON_SAVE_ERROR)):
            value = getattr(self, key)
            if value not in choices:
                raise ConfigError(f"train.{key} must be one of {', '.join(choices)}, got {value!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but no CUDA device is available")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ConfigError(f"train.resume: {self.resume!r} is not auto, never or a checkpoint directory")
        if self.eval_data and not Path(self.eval_data).exists():
            raise ConfigError(f"train.eval_data: {self.eval_data} does not exist")
        self.check_long_rows()
        check_reporters(self.report_to)
        _check_writable(Path(self.output_dir))

    def check_long_rows(self) -> None:
        """tiled_mlp, offload_activations and context_parallel against each other and the world size."""
        tiles = self.tiled_mlp
        if not (tiles is False or tiles == "auto" or (type(tiles) is int and tiles >= 1)):
            raise ConfigError(f'train.tiled_mlp must be "auto", a tile size in tokens (>= 1) or false, '
                              f"got {tiles!r}")
        if self.offload_activations and not self.activation_checkpointing:
            raise ConfigError("train.offload_activations moves the checkpointed blocks' inputs to host "
                              "memory: it needs train.activation_checkpointing = true")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % self.context_parallel:
            raise ConfigError(f"train.context_parallel = {self.context_parallel} splits each row over that "
                              f"many ranks: the number of ranks ({world}) must be a multiple of it (torchrun "
                              f"--nproc_per_node {self.context_parallel} ...)")


def router_coefficients(cfg: TrainConfig, model_coef: float) -> tuple[float, float]:
    """(load-balancing, z-loss) coefficients of a mixture-of-experts run: `router_aux_loss` true
    takes the model's `model_coef`, false none, a number itself."""
    aux = cfg.router_aux_loss
    if isinstance(aux, bool):
        aux = model_coef if aux else 0.0
    return float(aux), float(cfg.router_z_loss)


def _check_writable(path: Path) -> None:
    """`train.output_dir` exists as a writable directory, or could be created: its nearest existing
    ancestor is a writable directory."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a directory" if not existing.is_dir() else "permission denied"
        raise ConfigError(f"train.output_dir: cannot write to {path}: {why} ({existing})")
