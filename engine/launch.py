"""`packtune train`: turn a Config into a run (check it, build data, model and Trainer, export).

Everything a user can get wrong in the config is checked before the first expensive step
(loading a model, tokenizing a dataset), with the field and the file named.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from packtune.config import Config
from packtune.data.packing import LOSS_WEIGHTINGS, PACKING_STRATEGIES
from packtune.data.sources import resolve_sources
from packtune.errors import ConfigError, ModelError
from packtune.lora.apply import base_bytes
from packtune.lora.training import check_lora_run, lora_preparer, lora_summary
from packtune.parallel import DistContext
from packtune.reporters import check_reporters


def check_config(cfg: Config) -> None:
    """Raise ConfigError for values that cannot work: ranges, missing files, unwritable dirs."""
    t = cfg.train
    positive = {"lr": t.lr, "micro_batches": t.micro_batches, "log_every": t.log_every}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"train.{key} must be > 0, got {value!r}")
    non_negative = ("max_steps", "warmup", "save_every", "eval_every", "keep_checkpoints", "weight_decay",
                    "max_grad_norm", "max_bad_steps", "min_lr_ratio", "eval_generate_every")
    for key in non_negative:
        value = getattr(t, key)
        if value < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {value!r}")
    if not 0 <= t.eval_fraction < 1:
        raise ConfigError(f"train.eval_fraction must be in [0, 1), got {t.eval_fraction!r}")
    if t.max_steps == 0 and t.epochs <= 0:
        raise ConfigError("train.epochs must be > 0 when train.max_steps is 0")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {t.adam_betas!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    if t.resume not in ("auto", "never") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume: {t.resume!r} is not auto, never or a checkpoint directory")
    if t.progress not in ("auto", "bar", "line", "none"):
        raise ConfigError(f"train.progress must be auto, bar, line or none, got {t.progress!r}")
    check_reporters(t.report_to)
    check_loss_weighting(cfg)
    check_packing_strategy(cfg)
    for i, source in enumerate(resolve_sources(cfg.data)):
        if not Path(source["path"]).exists():
            key = f"data.sources[{i}].path" if cfg.data.sources else "data.path"
            raise ConfigError(f"{key}: {source['path']} does not exist")
    if not cfg.model.path:
        raise ConfigError("model.path is required (a Hugging Face model directory)")
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path: {cfg.model.path} has no config.json (not a Hugging Face directory)")
    check_writable(t.output_dir)
    if model_dtype(cfg.model.dtype) == torch.float16:
        raise ConfigError("model.dtype = 'float16' cannot train here: fp16 gradients need loss scaling, "
                          "which packtune does not do; use 'bfloat16' (bf16 compute, fp32 master weights)")
    check_model_config(cfg.model.path)
    check_lora_run(cfg)


def check_model_config(path: str) -> None:
    """Parse the model's config.json now, so an unsupported model_type is reported before the
    dataset is tokenized."""
    from packtune.model.config import ModelArgs

    try:
        ModelArgs.from_file(path)
    except ModelError as e:
        raise ModelError(f"model.path: {e}") from None


def check_packing_strategy(cfg: Config) -> None:
    if cfg.data.packing_strategy not in PACKING_STRATEGIES:
        raise ConfigError(f"data.packing_strategy must be one of {', '.join(PACKING_STRATEGIES)}, "
                          f"got {cfg.data.packing_strategy!r}")


def check_loss_weighting(cfg: Config) -> None:
    if cfg.train.loss_weighting not in LOSS_WEIGHTINGS:
        raise ConfigError(f"train.loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, "
                          f"got {cfg.train.loss_weighting!r}")


def check_writable(output_dir: str) -> None:
    """Create `output_dir` and prove a file can be written there."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"train.output_dir: cannot write to {path}: {e.strerror or e}") from None


def model_dtype(name: str) -> torch.dtype:
    """The dtype `model.dtype` names (`auto`: float32). Training keeps fp32 parameters whatever it
    is: `bfloat16` means bf16 compute over fp32 master weights (FSDP's MixedPrecisionPolicy, on
    CPU too), as `auto` on GPU; the export is written in the named dtype (see `export_dtype`)."""
    dtypes = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"model.dtype must be one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def export_dtype(cfg: Config, model) -> torch.dtype | None:
    """The export keeps the model's dtype: `model.dtype` when named, else the dtype the source
    checkpoint was stored in (None: the parameters' own)."""
    from packtune.model.hf_io import stored_dtype

    if cfg.model.dtype != "auto":
        return model_dtype(cfg.model.dtype)
    source = getattr(model, "source_dir", None)
    return stored_dtype(source) if source is not None else None


def export_model(trainer, cfg: Config) -> Path | None:
    """Gather the full weights on rank 0 and write `<output_dir>/final` as a Hugging Face directory
    (a LoRA run: the PEFT adapter and/or the merged model, as `train.export` says)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from packtune.lora.sharded_nf4 import gather_full_state, nf4_weights
    from packtune.lora.training import lora_enabled

    if nf4_weights(trainer.module):  # QLoRA: torch's gather cannot all-gather NF4 shards
        state = gather_full_state(trainer.module, keep=trainer.dist_ctx.is_main)
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(trainer.module, options=options)
    if not trainer.dist_ctx.is_main:
        return None
    state = {name.removeprefix("model."): tensor for name, tensor in state.items()}
    output_dir = Path(cfg.train.output_dir)
    write = lambda tensors, path: _write_model(trainer.model, tensors, path, cfg)
    if lora_enabled(cfg):
        from packtune.lora.apply import LoRASpec
        from packtune.lora.export import export_lora, export_mode

        return export_lora(trainer.model, LoRASpec.from_config(cfg.lora), state, output_dir,
                           export_mode(cfg.train.export), str(Path(cfg.model.path).resolve()), write)
    write(state, output_dir / "final")
    return output_dir / "final"


def _write_model(model, state: dict, path: Path, cfg: Config) -> None:
    """A Hugging Face model directory with the run's tokenizer files."""
    from packtune.model.hf_io import save_pretrained

    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    folder_files = sorted(tokenizer.glob("tokenizer*")) if tokenizer and tokenizer.is_dir() else []
    save_pretrained(model, path, tokenizer_files=folder_files, state_dict=state,
                    dtype=export_dtype(cfg, model))
    if tokenizer is not None and tokenizer.is_file():  # under the name loaders look for
        name = "tokenizer.json" if tokenizer.suffix == ".json" else "tokenizer.model"
        shutil.copyfile(tokenizer, path / name)


def run_training(cfg: Config) -> Path | None:
    """The whole run on this rank: returns the exported model directory (rank 0), else None.

    Everything that can refuse (the config, the model's config.json, what output_dir holds) is
    checked before anything is written; see packtune.rundir for what happens to an existing run.
    """
    from packtune.parallel import init_distributed, shutdown
    from packtune.reporters import open_reporters
    from packtune.rundir import complete_message, finish_run, plan_run, start_run
    from packtune.train import Trainer

    check_config(cfg)
    plan = plan_run(cfg)
    final = plan.output_dir / "final"
    if plan.complete:
        if os.environ.get("RANK", "0") == "0":
            print(complete_message(plan), flush=True)
        return final if final.is_dir() else None
    # bf16 compute over fp32 master weights; float32 computes in fp32 (auto: bf16 on GPU, fp32 on CPU)
    mixed_precision = {"auto": None, "float32": False, "bfloat16": True}[cfg.model.dtype]
    dist_ctx = init_distributed(cfg.train.device, mixed_precision=bool(mixed_precision))
    trainer = None
    try:
        if dist_ctx.is_main:
            moved = start_run(cfg, plan)
            if moved is not None:
                print(f"train.overwrite: moved the previous contents of {plan.output_dir} to {moved}",
                      flush=True)
        dist_ctx.barrier()
        reporters = open_reporters(cfg, plan.output_dir) if dist_ctx.is_main else []
        torch.manual_seed(cfg.train.seed)
        sampler, eval_sampler = build_samplers(cfg, dist_ctx)
        prepare = lora_preparer(cfg, dist_ctx.device, sharded=dist_ctx.mesh is not None)
        model, load_weights = load_model(cfg.model.path, torch.float32, dist_ctx, prepare)
        whole_base = base_bytes(model) if prepare is not None else 0  # before sharding: the whole base
        for s in (sampler, eval_sampler):
            if s is not None:
                check_token_ids(s.rows.dataset, model.args.vocab_size, cfg.data.tokenizer or cfg.model.path)
        generation_eval = None
        if cfg.train.eval_data:
            from packtune.datatools.evaluate import TrainingEval

            generation_eval = TrainingEval(cfg.train.eval_data, cfg.data.tokenizer or cfg.model.path,
                                           cfg.data.template)
        trainer = Trainer(cfg.train, model, sampler, dist_ctx, eval_sampler=eval_sampler,
                          generation_eval=generation_eval, flops_per_token=model.args.num_flops_per_token,
                          load_weights=load_weights, mixed_precision=mixed_precision, reporters=reporters)
        if prepare is not None and dist_ctx.is_main:
            print(lora_summary(cfg, model, dist_ctx.device, whole_base, dist_ctx.world_size), flush=True)
        resumed = trainer.resume()
        if resumed is not None and dist_ctx.is_main:
            print(f"resumed from {resumed} at step {trainer.step}", flush=True)
        if trainer.fit() < trainer.total_steps:
            return None
        exported = export_model(trainer, cfg) if cfg.train.export else None
        if dist_ctx.is_main:
            m = trainer.metrics
            line = finish_run(plan.output_dir, trainer.step, m.run_tokens, m.run_seconds, exported)
            print(line, flush=True)
        return exported
    finally:
        if trainer is not None:
            trainer.metrics.close()
        shutdown(dist_ctx)


def check_token_ids(dataset, vocab_size: int, tokenizer: str) -> None:
    """Refuse data whose token ids reach past the model's embedding (a tokenizer of another
    model), before step 1 rather than as an index error inside the embedding."""
    largest = int(dataset.tokens.max()) if len(dataset.tokens) else -1
    if largest >= vocab_size:
        raise ConfigError(f"the tokenizer ({tokenizer}) produced token id {largest}, a vocabulary of at "
                          f"least {largest + 1}, but the model's vocab_size is {vocab_size}; use the model's "
                          "own tokenizer (data.tokenizer) or resize its embeddings")


def load_model(path: str, dtype: torch.dtype, dist_ctx: DistContext, prepare=None):
    """The model to train and, when sharding, the function that fills its shards; `prepare`
    (e.g. adding LoRA adapters) is applied to the loaded model, or to both the meta model and
    rank 0's full copy.

    One process: load the checkpoint directly. Several ranks: every rank builds the model on
    the meta device (no memory), the Trainer shards it and allocates only the local shards, and
    rank 0 alone reads the checkpoint and broadcasts it shard by shard, so host memory holds one
    copy of the weights per node rather than one per GPU.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from packtune.errors import CheckpointError
    from packtune.model.config import ModelArgs
    from packtune.model.families import build_model
    from packtune.model.hf_io import load_pretrained

    try:
        if dist_ctx.mesh is None:
            model = load_pretrained(path, dtype=dtype)
            return (model if prepare is None else prepare(model)), None
        args = ModelArgs.from_file(path)
    except CheckpointError as e:
        raise ConfigError(f"model.path: {e}") from None
    with torch.device("meta"):
        model = build_model(args).to(dtype)
    model.source_dir = Path(path)
    if prepare is not None:
        model = prepare(model)

    def load_weights(module: torch.nn.Module) -> None:
        from packtune.lora.sharded_nf4 import load_nf4_weights, nf4_weights

        full = {}
        if dist_ctx.is_main:
            loaded = load_pretrained(path, dtype=dtype)
            if prepare is not None:
                loaded = prepare(loaded)
            full = {f"model.{k}": v for k, v in loaded.state_dict().items()}
        # QLoRA: torchao's NF4 tensor cannot be broadcast; rank 0 holds those weights dense and
        # every rank quantises them (packtune.lora.sharded_nf4). The rest is broadcast as usual.
        nf4 = nf4_weights(module)
        dense = {name: full.pop(name) for name in nf4 if dist_ctx.is_main}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not nf4)
        set_model_state_dict(module, full, options=options)
        if nf4:
            load_nf4_weights(module, dense, dist_ctx.device)

    return model, load_weights


def build_samplers(cfg: Config, dist_ctx: DistContext):
    """This rank's training sampler and held-out sampler (None without `train.eval_fraction`).

    The data report (records read, samples kept, dropped with reasons, tokens, packing efficiency) is printed
    by rank 0 before step 1.
    """
    from packtune.data import PackedSampler, data_report, format_report, prepare_dataset

    # One rank per node tokenizes (and fills the cache); the others then load the cached result.
    if dist_ctx.local_rank == 0:
        dataset = prepare_dataset(cfg.data, cfg.data.tokenizer or cfg.model.path)
    dist_ctx.barrier()
    if dist_ctx.local_rank != 0:
        dataset = prepare_dataset(cfg.data, cfg.data.tokenizer or cfg.model.path)
    train_set, eval_set = held_out_split(dataset, cfg.train.eval_fraction, cfg.train.seed)
    rows = build_rows(cfg, train_set)
    if dist_ctx.is_main:
        split = ("all samples" if eval_set is None
                 else f"training split ({len(train_set)} of {len(dataset)} samples)")
        report = data_report(train_set, rows, dist_ctx.world_size, cfg.train.micro_batches, split)
        print(format_report(report), flush=True)
        if eval_set is not None:
            print(f"  held out {len(eval_set)} samples for evaluation", flush=True)
    sampler = PackedSampler(rows, seed=cfg.train.seed, rank=dist_ctx.rank, world_size=dist_ctx.world_size,
                            micro_batches=cfg.train.micro_batches)
    eval_sampler = None
    if eval_set is not None:
        eval_sampler = PackedSampler(build_rows(cfg, eval_set), seed=cfg.train.seed, rank=dist_ctx.rank,
                                     world_size=dist_ctx.world_size, micro_batches=1)
    return sampler, eval_sampler


def build_rows(cfg: Config, dataset):
    """The dataset's rows as the config asks: packed (by data.packing_strategy) or padded, their
    batches weighted by train.loss_weighting."""
    check_loss_weighting(cfg)
    weighting = cfg.train.loss_weighting
    if cfg.data.packing:
        check_packing_strategy(cfg)
        return dataset.pack(strategy=cfg.data.packing_strategy, seed=cfg.train.seed, loss_weighting=weighting)
    return dataset.pad(cfg.data.padded_batch_size, cfg.train.seed, loss_weighting=weighting)


def held_out_split(dataset, fraction: float, seed: int):
    """(train, held-out) TokenizedDatasets: a seeded random `fraction` of the samples held out."""
    from packtune.data import TokenizedDataset

    if fraction <= 0:
        return dataset, None
    n = len(dataset)
    held = round(n * fraction)
    if not 1 <= held < n:
        raise ConfigError(f"train.eval_fraction = {fraction} holds out {held} of {n} samples; "
                          "it must leave at least one sample on each side")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return (TokenizedDataset(_subset(dataset, np.sort(perm[held:])), dataset.report),
            TokenizedDataset(_subset(dataset, np.sort(perm[:held])), dataset.report))


def _subset(dataset, index: np.ndarray) -> dict[str, np.ndarray]:
    lengths = dataset.lengths[index]
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    token_index = np.repeat(dataset.offsets[index] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return {"tokens": dataset.tokens[token_index], "mask": dataset.mask[token_index], "offsets": offsets,
            "lines": dataset.lines[index], "label_counts": dataset.label_counts[index]}
