"""The training loop.

One optimizer step (the loss contract, docs/how-it-works.md):
1. count this rank's label tokens, loss items (label tokens, or samples/turns under
   `loss_weighting`) and tokens on the host, all-reduce the counts over gloo (CPU, so the GPU
   stream never waits) together with a "stop requested" flag;
2. for each micro-batch: loss = sum of (weighted) token losses / global item count, backward
   (FSDP sums gradients over ranks, see parallel.py); a mixture of experts adds its router losses
   / the global micro-batch count (packtune.loss), so the step adds their mean; a loss module may
   take several normalizers (`Batch.normalizers()`: a preference step's pairs and chosen label
   tokens) and return metrics too, summed over the step like the loss;
3. all-reduce the loss (and metrics) for logging, measure and clip the global gradient norm;
4. NaN/inf guard: a non-finite loss or norm sets `optimizer.found_inf`, and the fused AdamW
   skips the update on the device, without a host sync; skips are counted when metrics are
   flushed, and a run aborts after `max_bad_steps` bad steps in a row;
5. advance the schedule; every `log_every` steps sync once and write metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from packtune.checkpoint import (
    checkpoint_root,
    load_checkpoint,
    newest_verified,
    save_checkpoint,
    verify_checkpoint,
)
from packtune.config import TrainConfig
from packtune.config.train import router_coefficients
from packtune.context_parallel import ContextChunks, check_model
from packtune.errors import CheckpointError, ConfigError, StorageError, TrainingError
from packtune.host_memory import release_freed_tensors
from packtune.loss import CausalLMLoss
from packtune.metrics import MetricsLogger, peak_flops, truncate_metrics
from packtune.model.families import family_for
from packtune.offload import ActivationOffload
from packtune.optim import build_optimizer, build_scheduler, clip_grad_norm
from packtune.parallel import DistContext, gathered_parameters, parallelize
from packtune.stop_signal import StopSignal
from packtune.tiled_mlp import resolve_tile_tokens, tile_mlps

if TYPE_CHECKING:
    from packtune.data.packing import PackedBatch, PaddedBatch


def progress_mode(progress: str, stream: Any = None) -> str:
    """`[train] progress` resolved: auto is a bar on a terminal (when tqdm is installed), else lines."""
    if progress != "auto":
        return progress
    import importlib.util
    import sys

    tty = (stream or sys.stdout).isatty()
    return "bar" if tty and importlib.util.find_spec("tqdm") is not None else "line"


class Trainer:
    """Owns the sharded model, optimizer, schedule, checkpoints and metrics of one run.

    `model` is a causal LM with `hidden_states(...)`, `lm_head` and its blocks in `model.block_lists`
    (or an encoder-decoder: T5); `loss_module` the root module over it whose forward gives a
    micro-batch's loss (default: the family's own, T5's `Seq2SeqLoss`, else CausalLMLoss(model)), or
    (loss, metrics) when it has `metric_names`; `sampler` yields, per optimizer step, this rank's list
    of micro-batches (`PackedBatch`, `PaddedBatch`, a preference `PreferenceBatch` or an
    encoder-decoder's `T5Batch`) and is resumable via state_dict(). A model built on the meta device
    is sharded, then only this rank's shards are allocated (empty): the caller fills them before
    `resume()` / `fit()` (packtune.model.loading.fill_shards), so no rank ever holds more than its
    shard on the accelerator. `mixed_precision` (default: on CUDA) computes in bf16 over the fp32
    parameters (see parallel.py). Long rows: `cfg.tiled_mlp` tiles the blocks' MLPs,
    `cfg.offload_activations` keeps the saved block inputs in host memory, and under context
    parallelism (`dist_ctx.context`) the samplers' whole rows become this rank's chunks. On the CPU with
    activation checkpointing, freed tensors' pages go back to the system at once (packtune.host_memory).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        sampler: Any,
        dist_ctx: DistContext,
        *,
        eval_sampler: Any = None,
        generation_eval: Callable[[nn.Module, DistContext], dict[str, Any]] | None = None,
        count_flops: bool = False,
        log_stream: Any = None,
        mixed_precision: bool | None = None,
        reporters: list | None = None,
        loss_module: nn.Module | None = None,
    ) -> None:
        if dist_ctx.context is not None:  # each rank of a row's group keeps its chunk (context_parallel.py)
            check_model(model, dist_ctx.context.size)
            sampler = ContextChunks(sampler, dist_ctx.context)
            eval_sampler = None if eval_sampler is None else ContextChunks(eval_sampler, dist_ctx.context)
        self.cfg, self.dist_ctx, self.sampler, self.eval_sampler = cfg, dist_ctx, sampler, eval_sampler
        if dist_ctx.device.type == "cpu" and cfg.activation_checkpointing:  # memory over speed: host_memory
            release_freed_tensors()
        self.generation_eval = generation_eval
        self.count_flops = count_flops
        """Count each step's training FLOPs from its batches' shapes (`batch.flops`), for MFU."""
        self.output_dir = Path(cfg.output_dir)
        if dist_ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        args = getattr(model, "args", None)  # a toy model without args trains as a causal LM
        family_loss = family_for(args.model_type).loss if args is not None else None
        tile_tokens = resolve_tile_tokens(cfg.tiled_mlp, model)
        if tile_tokens is not None:
            if family_loss is not None:
                raise ConfigError(f"train.tiled_mlp = {cfg.tiled_mlp!r}: tiling covers decoder-only models' "
                                  f"MLPs, not {args.model_type}'s blocks; set it to false")
            tile_mlps(model.decoder_layers, tile_tokens)
        self.offload = ActivationOffload(dist_ctx.device) if cfg.offload_activations else None
        router = router_coefficients(cfg, getattr(args, "router_aux_loss_coef", 0.0))
        if loss_module is None:  # the family's own (T5: Seq2SeqLoss), else the causal LM's
            loss_module = family_loss(model) if family_loss is not None else CausalLMLoss(model, *router)
        self.metric_names: tuple[str, ...] = tuple(getattr(loss_module, "metric_names", ()))
        self.module = parallelize(
            loss_module,
            model.block_lists,
            dist_ctx,
            activation_checkpointing=cfg.activation_checkpointing,
            compile_blocks=cfg.compile,
            mixed_precision=mixed_precision,
            preserve_rng_state=any(getattr(m, "draws_random", False) for m in model.modules()),
        )
        self.model = model
        if any(p.is_meta for p in self.module.parameters()):  # allocate only this rank's shards
            self.module.to_empty(device=dist_ctx.device)
        self.optimizer = build_optimizer(
            self.module,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps,
        )
        if len(sampler) == 0:
            raise TrainingError("nothing to train: the sampler yields no steps (is the dataset empty?)")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * len(sampler)
        self.scheduler = build_scheduler(
            self.optimizer, warmup=cfg.warmup, total_steps=self.total_steps, min_lr_ratio=cfg.min_lr_ratio
        )
        self.step = 0
        self.epoch = 0
        self.metrics = MetricsLogger(
            self.output_dir / "metrics.jsonl" if dist_ctx.is_main else None,
            self.total_steps,
            dist_ctx.world_size,
            peak_flops(dist_ctx.device),
            dist_ctx.device,
            max_bad_steps=cfg.max_bad_steps,
            stream=log_stream,
            reporters=list(reporters or []),
            progress=progress_mode(cfg.progress, log_stream),
        )

    # ---- resume -----------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Load the checkpoint `cfg.resume` names (auto: the newest that verifies against its
        manifest; each newer one skipped is named), if any.

        metrics.jsonl keeps only the records up to the step resumed from (none for a fresh run).
        """
        path = None
        if self.cfg.resume == "auto":
            path, skipped = newest_verified(self.output_dir, self.dist_ctx)
            if self.dist_ctx.is_main:
                for line in skipped:
                    print(f"skipped checkpoint {line}", flush=True)
            if path is None and skipped:
                raise CheckpointError(
                    f"no checkpoint in {checkpoint_root(self.output_dir)} verifies ({'; '.join(skipped)}); "
                    "nothing was deleted. Restore them from a copy, or start over with --overwrite (moves "
                    f"{self.output_dir} aside); `packtune check-checkpoint {self.output_dir}` lists them")
        elif self.cfg.resume != "never":
            path = Path(self.cfg.resume)
            if not path.is_dir():
                raise CheckpointError(f"train.resume: {path} is not a checkpoint directory")
            problem = verify_checkpoint(path, self.dist_ctx)
            if problem is not None:
                raise CheckpointError(f"train.resume: {path} does not verify: {problem}")
        if path is None:
            if self.dist_ctx.is_main:
                truncate_metrics(self.output_dir / "metrics.jsonl", 0)
            return None
        extra = load_checkpoint(path, self.dist_ctx, self.module, self.optimizer)
        self.step, self.epoch = extra["step"], extra["epoch"]
        self.scheduler.load_state_dict(extra["scheduler"])
        try:
            self.sampler.load_state_dict(extra["sampler"])
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {path}: {e}") from None
        self.metrics.skipped_steps = extra.get("skipped_total", 0)
        self.metrics.bad_in_a_row = extra.get("bad_in_a_row", 0)
        if self.dist_ctx.is_main:
            truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
        return path

    def save(self) -> Path:
        extra = {
            "epoch": self.epoch,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "skipped_total": self.metrics.skipped_steps,
            "bad_in_a_row": self.metrics.bad_in_a_row,
        }
        return save_checkpoint(
            self.output_dir, self.step, self.dist_ctx, self.module, self.optimizer, extra,
            keep=self.cfg.keep_checkpoints,
        )

    # ---- the loop ---------------------------------------------------------------------------

    def _step_batches(self) -> Iterator[list[Any]]:
        """The sampler's steps, epoch after epoch, from wherever it was restored to; the first step's
        batches must carry the configured loss weighting (the rows were built for one)."""
        first = True
        while True:
            for micro_batches in self.sampler:
                if first and any((b.loss_weights is None) != (self.cfg.loss_weighting == "token")
                                 for b in micro_batches):
                    raise TrainingError(f"train.loss_weighting = {self.cfg.loss_weighting!r} but the batches "
                                        "were built for another weighting (see PackedRows / PaddedRows "
                                        "loss_weighting)")
                first = False
                yield micro_batches
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)

    def fit(self) -> int:
        """Train until `total_steps` or a stop signal; returns the last step reached."""
        saved_at = self.step
        self.metrics.start_window()  # the first throughput excludes building and resuming
        with StopSignal() as stop:
            batches = self._step_batches()
            while self.step < self.total_steps:
                stop_now = self.train_step(next(batches), stop.requested)
                last = stop_now or self.step == self.total_steps
                if self.step % self.cfg.log_every == 0 or last:
                    self._flush()
                eval_every = self.cfg.eval_every if self.eval_sampler is not None else 0
                if eval_every and (self.step % eval_every == 0 or self.step == self.total_steps):
                    self.evaluate()
                every = self.cfg.eval_generate_every or self.total_steps
                if self.generation_eval and (self.step % every == 0 or self.step == self.total_steps):
                    with gathered_parameters(self.module):  # ranks generate their records independently
                        scores = self.generation_eval(self.model, self.dist_ctx)
                    self.metrics.log_generation_eval(self.step, scores)
                if (self.cfg.save_every and self.step % self.cfg.save_every == 0) or stop_now:
                    self._flush()
                    if self._save_or_continue(stopping=stop_now):
                        saved_at = self.step
                if stop_now:
                    if self.dist_ctx.is_main:
                        print(f"stop requested: saved step {self.step}, exiting", flush=True)
                    return self.step
        if self.cfg.save_every and saved_at != self.step:
            self._save_or_continue(stopping=False)
        return self.step

    def _save_or_continue(self, stopping: bool) -> bool:
        """Save; a checkpoint that cannot be written stops the run, or with `on_save_error =
        "continue"` is reported and retried at the next save (not when stopping: then it is the last)."""
        try:
            self.save()
            return True
        except StorageError as e:
            if self.cfg.on_save_error != "continue" or stopping:
                raise
            if self.dist_ctx.is_main:
                print(f"step {self.step}: {e} (train.on_save_error = 'continue': training goes on, the next "
                      "save tries again)", flush=True)
            return False

    def _flush(self) -> None:
        self.metrics.flush()
        if self.cfg.max_bad_steps and self.metrics.bad_in_a_row >= self.cfg.max_bad_steps:
            raise TrainingError(
                f"{self.metrics.bad_in_a_row} steps in a row had a non-finite loss or gradient norm "
                f"(train.max_bad_steps = {self.cfg.max_bad_steps}); stopping at step {self.step}"
            )

    def _num_items(self, counts: list[int]) -> torch.Tensor:
        """The global loss-item count(s) as a float32 device tensor (a scalar for one), copied without
        a sync."""
        values = [float(c) for c in counts]
        host = torch.tensor(values if len(values) > 1 else values[0], dtype=torch.float32)
        if self.dist_ctx.device.type == "cuda":
            return host.pin_memory().to(self.dist_ctx.device, non_blocking=True)
        return host

    def train_step(self, micro_batches: list[Any], stop_requested: bool = False) -> bool:
        """One optimizer step; returns True when any rank asked to stop after it."""
        device = self.dist_ctx.device
        normalizers = [sum(n) for n in zip(*(b.normalizers() for b in micro_batches), strict=True)]
        counts = torch.tensor(
            [sum(b.num_label_tokens for b in micro_batches), sum(b.num_tokens for b in micro_batches),
             int(stop_requested), len(micro_batches), *normalizers],
            dtype=torch.int64,
        )
        self.dist_ctx.all_reduce_sum(counts)  # a CPU tensor: gloo, never waits on the GPU
        label_tokens, tokens, stops, batches, *items = counts.tolist()
        num_items = self._num_items(items)
        flops = 0.0
        sums = torch.zeros(1 + len(self.metric_names), device=device, dtype=torch.float32)  # loss, metrics
        router = None  # MoE: [aux, z] (their mean over the step's micro-batches) and the expert counts
        for batch in micro_batches:
            if self.count_flops:
                flops += batch.flops(self.model.args)
            out = self._loss(batch, num_items, weighted=True, router_weight=1.0 / batches)
            loss, metrics = self._split(out)
            loss.backward()
            sums += torch.cat([loss.detach().float()[None], metrics.float()])
            if getattr(self.module, "router_stats", None) is not None:
                terms, experts = self.module.router_stats
                part = torch.cat([terms / batches, experts.flatten()])
                router, layers = (part if router is None else router + part), experts.shape
        named = len(sums)
        if router is not None:  # one all-reduce for both
            sums = torch.cat([sums, router])
        sums = self.dist_ctx.all_reduce_sum(sums)
        loss_sum, router = sums[0], (None if router is None else sums[named:])
        grad_norm = clip_grad_norm(self.module.parameters(), self.cfg.max_grad_norm).to(device)
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        flops = self.dist_ctx.world_size * flops  # every rank's share, assuming balanced ranks
        values = torch.stack([loss_sum, grad_norm.float(), finite.float()])
        extra = dict(zip(self.metric_names, sums[1:named], strict=True))
        if router is not None:
            extra.update(router_metrics(router[:2], router[2:].view(layers)))
        self.metrics.record(self.step, lr, tokens, label_tokens, flops, values, extra)
        return stops > 0

    def _split(self, out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, metrics) of the loss module's output (no metrics: an empty tensor)."""
        if isinstance(out, tuple):
            return out
        return out, out.new_zeros(0)

    def _loss(self, batch: PackedBatch | PaddedBatch, num_items: torch.Tensor | None = None,
              weighted: bool = False, router_weight: float = 0.0) -> torch.Tensor:
        """Summed token loss of one micro-batch (times its loss weights when `weighted`, ÷ num_items
        when given), packed or padded; plus `router_weight` x its router losses (MoE models)."""
        batch = batch.to(self.dist_ctx.device)
        with self.offload or contextlib.nullcontext():
            return self.module(batch.input_ids, batch.labels, batch.layout, num_items=num_items,
                               loss_weights=batch.loss_weights if weighted else None,
                               router_weight=router_weight, **batch.loss_inputs())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the held-out split (all ranks), logged to metrics.jsonl; unweighted
        whatever `loss_weighting` is, so runs with different weightings compare. A loss module with
        metrics (preference objectives) is evaluated as it trains: its loss and metrics over the whole
        split, as one step over every held-out batch."""
        if self.metric_names:
            return self._evaluate_with_metrics()
        totals = torch.zeros(2, dtype=torch.float64, device=self.dist_ctx.device)
        self.eval_sampler.set_epoch(0)
        for micro_batches in self.eval_sampler:
            for batch in micro_batches:
                loss = self._loss(batch)
                totals[0] += loss.double()
                totals[1] += batch.num_label_tokens
        self.dist_ctx.all_reduce_sum(totals)
        loss_sum, count = totals.tolist()
        mean = loss_sum / max(count, 1.0)
        if self.dist_ctx.is_main:
            self.metrics.log_eval(self.step, mean, int(count))
        return mean

    def _evaluate_with_metrics(self) -> float:
        self.eval_sampler.set_epoch(0)
        batches = [batch for micro_batches in self.eval_sampler for batch in micro_batches]
        counts = torch.tensor([sum(n) for n in zip(*(b.normalizers() for b in batches), strict=True)]
                              + [sum(b.num_label_tokens for b in batches)], dtype=torch.int64)
        self.dist_ctx.all_reduce_sum(counts)
        *items, label_tokens = counts.tolist()
        num_items = self._num_items(items)
        sums = torch.zeros(1 + len(self.metric_names), dtype=torch.float64, device=self.dist_ctx.device)
        for batch in batches:
            loss, metrics = self._split(self._loss(batch, num_items))
            sums += torch.cat([loss.double()[None], metrics.double()])
        self.dist_ctx.all_reduce_sum(sums)
        loss, *metrics = sums.tolist()
        if self.dist_ctx.is_main:
            named = dict(zip(self.metric_names, metrics, strict=True))
            self.metrics.log_eval(self.step, loss, label_tokens, named)
        return loss


def router_metrics(terms: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """A mixture-of-experts step's router metrics, on the device: the mean load-balancing and z-loss
    (`terms`, unscaled by their coefficients) and the least and most loaded expert's share of its
    layer's routed (token, expert) pairs (`counts` [sparse layers, E]; 1 / E each when balanced)."""
    share = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    return {"router_aux_loss": terms[0], "router_z_loss": terms[1], "router_load_min": share.min(),
            "router_load_max": share.max()}
