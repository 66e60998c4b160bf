"""Tokenize a data file once into memory-mapped arrays: `prepare_dataset` and `TokenizedDataset`.

rows -> formats -> template -> SegmentEncoder, in chunks, in parallel worker processes; samples
longer than `max_tokens` are dropped or truncated; samples with no label token are dropped; every
dropped or truncated row is counted with its reason. The result is cached (see cache.py).

Storage: `tokens` (int32), `mask` (bool, True where the token is a training target), `offsets`
(int64, n+1), `lines` (the source line or item of each sample) and `label_counts` (int64: label
tokens per sample once labels are shifted, i.e. trainable tokens after the first position).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from packtune.config import ConfigError, DataConfig
from packtune.data import cache
from packtune.data.errors import DataError
from packtune.data.formats import (
    FORMATS,
    decode_row,
    detect_format,
    field_names,
    location,
    read_rows,
    to_conversation,
)
from packtune.data.templates import TRAIN_ON, get_template, render
from packtune.data.tokenize import SegmentEncoder, default_threads, load_tokenizer

CHUNK_ROWS = 2048
MAX_ERRORS_KEPT = 5


class TokenizedDataset:
    """Tokenized samples (memory-mapped) and the tokenization report."""

    def __init__(self, arrays: dict[str, np.ndarray], report: dict[str, Any], cache_path: Path | None = None):
        self.tokens, self.mask, self.offsets = arrays["tokens"], arrays["mask"], arrays["offsets"]
        self.lines, self.label_counts = arrays["lines"], arrays["label_counts"]
        self.report = report
        self.cache_path = cache_path
        self.max_tokens: int = report["max_tokens"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, trainable mask) of sample `i`."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[lo:hi], self.mask[lo:hi]

    def pack(self, max_tokens: int | None = None, strategy: str = "bfd", seed: int = 0,
             loss_weighting: str = "token"):
        """Rows of at most `max_tokens` tokens (default: the prepared max_tokens), packed by
        `strategy` (best-fit decreasing, or best fit over a seeded shuffle); their batches carry
        the loss weights of `loss_weighting` (token, sample or turn)."""
        from packtune.data.packing import PackedRows

        return PackedRows.packed(self, max_tokens or self.max_tokens, strategy, seed, loss_weighting)

    def pad(self, batch_size: int, seed: int = 0, loss_weighting: str = "token"):
        """Padded micro-batches of `batch_size` samples in a seeded random grouping, for comparison."""
        from packtune.data.packing import PaddedRows

        return PaddedRows.random_groups(self, batch_size, seed, loss_weighting)


def prepare_dataset(
    data_cfg: DataConfig,
    tokenizer_path: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    use_cache: bool = True,
) -> TokenizedDataset:
    """Tokenize `data_cfg.path` (or load it from the cache) with the tokenizer at `tokenizer_path`
    (default `data_cfg.tokenizer`)."""
    options = _options(data_cfg, tokenizer_path)
    workers = num_workers or data_cfg.num_workers or default_threads()
    tokenizer = load_tokenizer(options["tokenizer"])
    folder = None
    if use_cache:
        key = cache.cache_key(
            {
                "data": cache.file_digest(options["path"])
                if Path(options["path"]).is_file()
                else options["path"],
                "tokenizer": tokenizer.fingerprint(),
                "template": dataclasses.asdict(get_template(options["template"])),
                **{k: v for k, v in options.items() if k not in ("path", "tokenizer", "template")},
            }
        )
        folder = Path(cache_dir or data_cfg.cache_dir or cache.default_cache_dir()) / key
        start = time.perf_counter()
        hit = cache.load(folder)
        if hit is not None:
            arrays, meta = hit
            report = {**meta["report"], "cache": "hit", "load_seconds": time.perf_counter() - start}
            return TokenizedDataset(arrays, report, folder)
    start = time.perf_counter()
    arrays, report = tokenize_file(options, workers)
    report["tokenize_seconds"] = time.perf_counter() - start
    if folder is not None:
        cache.save(folder, arrays, {"report": report, "options": options})
        report["cache"] = "written"
        return TokenizedDataset(cache.load(folder)[0], report, folder)
    return TokenizedDataset(arrays, report)


def _options(cfg: DataConfig, tokenizer_path: str | Path | None) -> dict[str, Any]:
    """The settings that decide the tokenized result, checked (they also make up the cache key)."""
    if not cfg.path:
        raise ConfigError("data.path is not set: give a JSONL or JSON file of training rows")
    tokenizer = str(tokenizer_path or cfg.tokenizer)
    if not tokenizer:
        raise ConfigError("no tokenizer: set data.tokenizer (a .model or tokenizer.json) or model.path")
    for key, value, valid in (
        ("format", cfg.format, ("auto", *FORMATS)),
        ("train_on", cfg.train_on, TRAIN_ON),
        ("truncation", cfg.truncation, ("drop", "truncate")),
    ):
        if value not in valid:
            raise ConfigError(f"data.{key}: {value!r} is not one of {', '.join(valid)}")
    if cfg.max_tokens < 2:
        raise ConfigError(f"data.max_tokens: must be at least 2, got {cfg.max_tokens}")
    get_template(cfg.template)
    field_names(cfg.field_map)
    return {
        "path": str(cfg.path),
        "tokenizer": tokenizer,
        "template": cfg.template,
        "format": cfg.format,
        "field_map": list(cfg.field_map),
        "train_on": cfg.train_on,
        "truncation": cfg.truncation,
        "max_tokens": cfg.max_tokens,
        "skip_bad_rows": cfg.skip_bad_rows,
    }


def tokenize_file(options: dict[str, Any], workers: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read, render and tokenize every row; chunks run in `workers` processes, results in file order."""
    in_array, rows = read_rows(options["path"])
    if options["format"] == "auto":
        options = {**options, "format": _detect(options, rows, in_array)}
    chunks = [rows[i : i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]
    job = {**options, "in_array": in_array}
    if workers > 1 and len(chunks) > 1:
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(chunks)), _init_worker, (job, 1)) as pool:
            results = list(pool.imap(_run_chunk, chunks))
    else:
        tokenize_chunk = ChunkTokenizer(job, threads=workers)
        results = [tokenize_chunk(chunk) for chunk in chunks]
    return _combine(results, options, len(rows))


def _detect(options: dict[str, Any], rows: list, in_array: bool) -> str:
    fields = field_names(options["field_map"])
    for number, raw in rows:
        where = location(options["path"], number, in_array)
        try:
            return detect_format(decode_row(where, raw), fields, where)
        except DataError:
            if not options["skip_bad_rows"]:
                raise
    raise DataError(f"{options['path']}: no row is readable, so the format cannot be detected", "empty_file")


class ChunkTokenizer:
    """Tokenizes chunks of raw rows for one process (the tokenizer and template loaded once)."""

    def __init__(self, job: dict[str, Any], threads: int = 1) -> None:
        self.job = job
        self.fields = field_names(job["field_map"])
        self.template = get_template(job["template"])
        self.encoder = SegmentEncoder(load_tokenizer(job["tokenizer"], threads))

    def __call__(self, chunk: list[tuple[int, Any]]) -> dict[str, Any]:
        job, max_tokens = self.job, self.job["max_tokens"]
        errors: list[tuple[int, DataError]] = []
        rendered, wheres, numbers = [], [], []
        for number, raw in chunk:
            where = location(job["path"], number, job["in_array"])
            try:
                conv = to_conversation(decode_row(where, raw), job["format"], self.fields, where)
                rendered.append(render(conv, self.template, where, job["train_on"]))
            except DataError as e:
                errors.append((number, e))
                continue
            wheres.append(where)
            numbers.append(number)
        dropped, truncated = Counter(), Counter()
        ids_out: list[int] = []
        mask_out: list[bool] = []
        lengths, kept_numbers = [], []
        for number, result in zip(numbers, self.encoder.encode_rows(rendered, wheres), strict=True):
            if isinstance(result, DataError):
                errors.append((number, result))
                continue
            ids, mask = result
            if len(ids) > max_tokens:
                if job["truncation"] == "drop":
                    dropped["too_long"] += 1
                    continue
                ids, mask = ids[:max_tokens], mask[:max_tokens]
                if not any(mask[1:]):
                    dropped["no_label_tokens_after_truncation"] += 1
                    continue
                truncated["too_long"] += 1
            elif not any(mask[1:]):
                dropped["no_label_tokens"] += 1
                continue
            ids_out += ids
            mask_out += mask
            lengths.append(len(ids))
            kept_numbers.append(number)
        errors.sort(key=lambda item: item[0])
        if errors and not job["skip_bad_rows"]:
            raise errors[0][1]
        for _, e in errors:
            dropped[e.reason] += 1
        return {
            "tokens": np.array(ids_out, dtype=np.int32),
            "mask": np.array(mask_out, dtype=bool),
            "lengths": np.array(lengths, dtype=np.int64),
            "lines": np.array(kept_numbers, dtype=np.int64),
            "dropped": dropped,
            "truncated": truncated,
            "errors": [str(e) for _, e in errors[:MAX_ERRORS_KEPT]],
        }


_WORKER: dict[str, ChunkTokenizer] = {}


def _init_worker(job: dict[str, Any], threads: int) -> None:
    _WORKER["tokenize"] = ChunkTokenizer(job, threads)


def _run_chunk(chunk: list[tuple[int, Any]]) -> dict[str, Any]:
    return _WORKER["tokenize"](chunk)


def _combine(
    results: list[dict[str, Any]], options: dict[str, Any], n_rows: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    tokens = np.concatenate([r["tokens"] for r in results]).astype(np.int32, copy=False)
    mask = np.concatenate([r["mask"] for r in results])
    lengths = np.concatenate([r["lengths"] for r in results])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(lengths) == 0:
        raise DataError(
            f"{options['path']}: no sample was kept out of {n_rows} rows "
            f"(dropped: {dict(sum((r['dropped'] for r in results), Counter()))})",
            "no_samples",
        )
    trained = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    label_counts = trained[offsets[1:]] - trained[offsets[:-1] + 1]
    dropped = sum((r["dropped"] for r in results), Counter())
    truncated = sum((r["truncated"] for r in results), Counter())
    n_label = int(label_counts.sum())
    report = {
        "rows": n_rows,
        "kept": len(lengths),
        "dropped": dict(sorted(dropped.items())),
        "truncated": dict(sorted(truncated.items())),
        "tokens": int(len(tokens)),
        "label_tokens": n_label,
        "label_share": n_label / max(len(tokens), 1),
        "format": options["format"],
        "template": options["template"],
        "max_tokens": options["max_tokens"],
        "errors": [e for r in results for e in r["errors"]][:MAX_ERRORS_KEPT],
    }
    arrays = {
        "tokens": tokens,
        "mask": mask,
        "offsets": offsets,
        "lines": np.concatenate([r["lines"] for r in results]),
        "label_counts": label_counts,
    }
    return arrays, report
