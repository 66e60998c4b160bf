"""The reference model's log-probs, computed once in a pass before training, and cached.

DPO and IPO compare the policy with a reference: `[preference] ref_model`, or the policy as the
run starts (with LoRA: the base with the adapters it starts from, which fresh adapters leave
unchanged: the base). Its log-probs of every pair never change, so rather than a second model
held in memory and run beside every step (TRL's default), one pass over the pairs before step 1
computes them (no gradients, the policy itself when it is the reference, before a checkpoint is
resumed), and training reads them from the batches. Each rank scores its share of the rows and
one all-reduce (gloo, float64) gathers them.

They are cached beside the tokenized data (`reference-<key>.npy` in its cache folder), keyed by
the reference's files (weights, config; the LoRA adapter it starts from and the base's storage),
the compute dtype and the row layout, so a resumed or repeated run reads them back.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from packtune.config import REFERENCE_OBJECTIVES, Config
from packtune.data import cache
from packtune.data.dataset import TokenizedDataset
from packtune.errors import ConfigError
from packtune.parallel import DistContext, parallelize
from packtune.preference.loss import PreferenceLoss
from packtune.preference.packing import PackedPairRows


def reference_key(cfg: Config, dtype: torch.dtype) -> str:
    """What decides the reference log-probs (besides the data, which names the cache folder)."""
    parts = {"dtype": str(dtype), "shared_prompt": cfg.preference.shared_prompt,
             "max_tokens": cfg.data.max_tokens}
    if cfg.preference.ref_model:
        parts["model"] = _model_digest(cfg.preference.ref_model)
    else:
        parts["model"] = _model_digest(cfg.model.path)
        if cfg.lora.enabled:
            parts["lora_base_dtype"] = cfg.lora.base_dtype
            parts["lora_init_from"] = cache.path_digest(cfg.lora.init_from) if cfg.lora.init_from else ""
    return cache.cache_key(parts)


def _model_digest(path: str) -> str:
    """The digest of a model directory's config and weight files (tokenizer files aside)."""
    folder = Path(path)
    files = sorted(p for p in folder.iterdir()
                   if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    return cache.cache_key({p.name: cache.file_digest(p) for p in files})


def attach_reference(cfg: Config, dataset: TokenizedDataset, trainer, dist_ctx: DistContext,
                     mixed: bool) -> np.ndarray | None:
    """Give the trainer's samplers the reference log-probs of their pairs (read from the cache or
    computed); returns the `[pairs, 2]` array (None for a reference-free objective)."""
    if cfg.train.objective not in REFERENCE_OBJECTIVES:
        return None
    dtype = torch.bfloat16 if mixed else torch.float32
    path = None
    if dataset.cache_path is not None:
        path = Path(dataset.cache_path) / f"reference-{reference_key(cfg, dtype)}.npy"
    if path is not None and path.is_file():
        logps = np.load(path)
        source = f"read from {path}"
    else:
        logps = compute_reference(cfg, dataset, trainer, dist_ctx, mixed)
        if path is not None and dist_ctx.is_main:
            _save(path, logps)
        dist_ctx.barrier()
        source = "computed" + (f", cached in {path}" if path is not None else "")
    for sampler in (trainer.sampler, trainer.eval_sampler):
        if sampler is not None:
            sampler.rows.ref_logps = logps
    if dist_ctx.is_main:
        what = cfg.preference.ref_model or "the policy as it starts"
        print(f"reference log-probs of {len(logps)} pairs ({what}): {source}", flush=True)
    return logps


def _save(path: Path, logps: np.ndarray) -> None:
    """Write atomically: a temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        np.save(f, logps)
    os.replace(tmp, path)


def compute_reference(cfg: Config, dataset: TokenizedDataset, trainer, dist_ctx: DistContext,
                      mixed: bool) -> np.ndarray:
    """Float64 `[pairs, 2]` reference log-probs of every pair of `dataset`, scored by every rank."""
    rows = PackedPairRows.packed(dataset, dataset.max_tokens, cfg.preference.shared_prompt)
    rows = rows.with_row_multiple(dist_ctx.world_size)
    module = trainer.module
    if cfg.preference.ref_model:
        module = _reference_module(cfg, dist_ctx, mixed, trainer)
    out = torch.zeros(len(dataset.prompt_lengths), 2, dtype=torch.float64)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for row in range(dist_ctx.rank, len(rows), dist_ctx.world_size):
            batch = rows.collate(row)
            on_device = batch.to(dist_ctx.device)
            logps = module(on_device.input_ids, on_device.labels, on_device.layout)
            out[torch.from_numpy(batch.pairs)] = logps.double().cpu()
    module.train(was_training)
    if module is not trainer.module:
        del module
        gc.collect()
    dist_ctx.all_reduce_sum(out)
    return out.numpy()


def _reference_module(cfg: Config, dist_ctx: DistContext, mixed: bool, trainer) -> torch.nn.Module:
    """`preference.ref_model` loaded and sharded as the policy is (frozen), in a PreferenceLoss root."""
    from packtune.model.config import ModelArgs
    from packtune.model.loading import fill_shards, load_for_training

    path = cfg.preference.ref_model
    vocab = ModelArgs.from_file(path).vocab_size
    if vocab != trainer.model.args.vocab_size:
        raise ConfigError(f"preference.ref_model: {path} has a vocabulary of {vocab}, the policy "
                          f"{trainer.model.args.vocab_size}; the reference must share the policy's tokenizer")
    model = load_for_training(path, dist_ctx)
    model.requires_grad_(False)
    root = parallelize(PreferenceLoss(model, cfg.train.objective, cfg.preference), model.decoder_layers,
                       dist_ctx, mixed_precision=mixed)
    if any(p.is_meta for p in root.parameters()):
        root.to_empty(device=dist_ctx.device)
        fill_shards(root, path, dist_ctx)
    return root

