"""`packtune train`: a run, as the list of its stages.

    check    every config key, in its section (packtune.config), before anything is written
    plan     what output_dir holds decides: new run, resume, already complete, or refused (rundir)
    lock     rank 0 locks output_dir for this run (runlock): a second run there is refused
    data     tokenize (cached), hold out, build rows, deal them to this rank (data/rows.py; preference
             pairs: preference/rows.py)
    model    load the checkpoint in fp32, add LoRA adapters; on the meta device when sharded
             (model/loading.py)
    train    shard, fill the shards, (DPO / IPO: the reference pass, preference/reference.py),
             resume, fit (train.py)
    export   final/ (and final-merged/) on rank 0 (export.py)

`packtune check` and `packtune bench e2e` run the same stages (`prepare_run_data`,
`load_for_training` + `fill_shards`, `Trainer`, `export_model`), not copies of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from packtune.config import Config
from packtune.data.rows import RunData, prepare_run_data
from packtune.errors import ConfigError
from packtune.export import export_model
from packtune.lora.apply import base_bytes
from packtune.lora.training import lora_preparer, lora_summary
from packtune.model.families import encoder_decoder
from packtune.model.loading import fill_shards, load_for_training
from packtune.parallel import DistContext, init_distributed, resolve_device, shutdown
from packtune.precision import compute_dtype
from packtune.rank_loss import lost_rank_error
from packtune.reporters import open_reporters
from packtune.rundir import complete_message, finish_run, plan_run, start_run
from packtune.runlock import lock_for_run
from packtune.train import Trainer


def run(cfg: Config) -> Path | None:
    """The whole run on this rank: returns the exported model directory (rank 0), else None."""
    cfg.check()
    plan = plan_run(cfg)
    final = plan.output_dir / "final"
    if plan.complete:
        if os.environ.get("RANK", "0") == "0":
            print(complete_message(plan), flush=True)
        return final if final.is_dir() else None
    mixed = mixed_precision(cfg)
    dist_ctx = init_distributed(cfg.train.device, mixed_precision=mixed,
                                context_parallel=cfg.train.context_parallel)
    trainer = lock = None
    clean = False
    try:
        lock = lock_for_run(plan.output_dir, dist_ctx)
        if lock is not None:
            if lock.took_over:
                print(lock.took_over, flush=True)
            moved = start_run(cfg, plan)
            if moved is not None:
                lock.follow(plan.output_dir)  # the lock file moved aside with the old contents
                print(f"train.overwrite: moved the previous contents of {plan.output_dir} to {moved}",
                      flush=True)
        dist_ctx.barrier()
        torch.manual_seed(cfg.train.seed)
        data = prepare_run_data(cfg, dist_ctx)
        trainer = build_trainer(cfg, data, dist_ctx, mixed)
        if data.dataset is not None:  # before resuming: the policy as it starts may be the reference
            from packtune.preference.reference import attach_reference

            attach_reference(cfg, data.dataset, trainer, dist_ctx, mixed)
        resumed = trainer.resume()
        if resumed is not None and dist_ctx.is_main:
            print(f"resumed from {resumed} at step {trainer.step}", flush=True)
        if trainer.fit() < trainer.total_steps:
            clean = True
            return None  # stopped by a signal, after saving
        exported = export_model(trainer, cfg) if cfg.train.export else None
        if dist_ctx.is_main:
            m = trainer.metrics
            line = finish_run(plan.output_dir, trainer.step, m.run_tokens, m.run_seconds, exported)
            print(line, flush=True)
        clean = True
        return exported
    except RuntimeError as e:
        lost = lost_rank_error(dist_ctx, e)
        if lost is None:
            raise
        raise lost from None
    finally:
        if trainer is not None:
            trainer.metrics.close()
        shutdown(dist_ctx, clean=clean)
        if lock is not None:
            lock.release()


def mixed_precision(cfg: Config) -> bool:
    """Whether the run computes in bf16 over its fp32 master weights (packtune.precision's rule)."""
    return compute_dtype(cfg.model.dtype, resolve_device(cfg.train.device)) == torch.bfloat16


def build_trainer(cfg: Config, data: RunData, dist_ctx: DistContext, mixed: bool) -> Trainer:
    """The model stage and the Trainer over it: loaded (LoRA added), sharded, its shards filled;
    the token ids checked against its vocabulary; the LoRA line printed."""
    prepare = lora_preparer(cfg, dist_ctx.device, sharded=dist_ctx.mesh is not None)
    model = load_for_training(cfg.model.path, dist_ctx, prepare)
    whole_base = base_bytes(model) if prepare is not None else 0  # before sharding: the whole base
    for sampler in (data.sampler, data.eval_sampler):
        if sampler is not None:
            check_token_ids(sampler.rows.dataset, model.args.vocab_size, cfg.tokenizer)
    generation_eval = None
    if cfg.train.eval_data:
        from packtune.datatools.evaluate import TrainingEval

        generation_eval = TrainingEval(cfg.train.eval_data, cfg.tokenizer, cfg.data.template,
                                       encoder_decoder(model))
    loss_module = None  # the model family's own (Trainer), T5's Seq2SeqLoss included
    if cfg.train.objective != "sft":
        from packtune.preference.loss import preference_loss

        loss_module = preference_loss(cfg, model)
    trainer = Trainer(cfg.train, model, data.sampler, dist_ctx, eval_sampler=data.eval_sampler,
                      generation_eval=generation_eval, count_flops=True,
                      mixed_precision=mixed, reporters=open_reporters(cfg) if dist_ctx.is_main else [],
                      loss_module=loss_module)
    if dist_ctx.mesh is not None:
        fill_shards(trainer.module, cfg.model.path, dist_ctx, prepare)
    if prepare is not None and dist_ctx.is_main:
        print(lora_summary(cfg, model, dist_ctx.device, whole_base, dist_ctx.world_size), flush=True)
    return trainer


def check_token_ids(dataset, vocab_size: int, tokenizer: str) -> None:
    """Refuse data whose token ids reach past the model's embedding (a tokenizer of another
    model), before step 1 rather than as an index error inside the embedding."""
    largest = int(dataset.tokens.max()) if len(dataset.tokens) else -1
    if largest >= vocab_size:
        raise ConfigError(f"the tokenizer ({tokenizer}) produced token id {largest}, a vocabulary of at "
                          f"least {largest + 1}, but the model's vocab_size is {vocab_size}; use the model's "
                          "own tokenizer (data.tokenizer) or resize its embeddings")
