"""Tokenize the data sources once into memory-mapped arrays: `prepare_dataset` and `TokenizedDataset`.

sources (read as streams, mixed by weight; sources.py) -> formats -> template -> ChatEncoder, in
chunks, in parallel worker processes; samples longer than `max_tokens` are dropped or truncated;
samples with no label token are dropped; every dropped or truncated record is counted with its
reason. The result is cached (see cache.py).

Storage: `tokens` (int32), `mask` (bool, True where the token is a training target), `offsets`
(int64, n+1), `lines` (the line, item or record of each sample in its source file) and
`label_counts` (int64: label tokens per sample once labels are shifted, i.e. trainable tokens
after the first position). Preference records (format `preference`) are tokenized by
packtune.preference.data into pairs of adjacent samples, with one more array, `prompt_lengths`.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from packtune.config import DataConfig
from packtune.data import cache, fidelity
from packtune.data.chat_format import make_chat_format, template_identity
from packtune.data.formats import decode_record, field_names, location, to_conversation
from packtune.data.pairs import PairChunkTokenizer, check_pair_options, pair_template
from packtune.data.record_errors import MAX_ERRORS_KEPT, settle_errors
from packtune.data.sources import OpenSource, resolve_sources
from packtune.data.tokenizer import default_threads, load_tokenizer
from packtune.errors import DataError

CHUNK_RECORDS = 2048


class TokenizedDataset:
    """Tokenized samples (memory-mapped) and the tokenization report."""

    def __init__(self, arrays: dict[str, np.ndarray], report: dict[str, Any], cache_path: Path | None = None):
        self.tokens, self.mask, self.offsets = arrays["tokens"], arrays["mask"], arrays["offsets"]
        self.lines, self.label_counts = arrays["lines"], arrays["label_counts"]
        self.prompt_lengths: np.ndarray | None = arrays.get("prompt_lengths")
        """Preference data: the prompt's tokens of each pair (samples 2i and 2i+1); None for SFT data."""
        self.report = report
        self.cache_path = cache_path
        self.max_tokens: int = report["max_tokens"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, index: np.ndarray) -> TokenizedDataset:
        """The samples at `index` (in that order) as a dataset of their own, with this one's report."""
        lengths = self.lengths[index]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        token_index = np.repeat(self.offsets[index] - offsets[:-1], lengths) + np.arange(offsets[-1])
        arrays = {"tokens": self.tokens[token_index], "mask": self.mask[token_index], "offsets": offsets,
                  "lines": self.lines[index], "label_counts": self.label_counts[index]}
        if self.prompt_lengths is not None:
            pairs = np.asarray(index)[::2] // 2
            if not np.array_equal(index, np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)):
                raise ValueError("a subset of preference data takes whole pairs: samples 2i, 2i + 1")
            arrays["prompt_lengths"] = self.prompt_lengths[pairs]
        return TokenizedDataset(arrays, self.report)

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
    pairs: bool = False,
) -> TokenizedDataset:
    """Tokenize `data_cfg.path` or `data_cfg.sources` (or load them from the cache) with the
    tokenizer at `tokenizer_path` (default `data_cfg.tokenizer`); `pairs`: as (input, target) pairs
    for an encoder-decoder (data/pairs.py)."""
    options = _options(data_cfg, tokenizer_path, pairs)
    workers = num_workers or data_cfg.num_workers or default_threads()
    tokenizer = load_tokenizer(options["tokenizer"])
    folder = None
    if use_cache:
        key = cache.cache_key(
            {
                # A source is known by its bytes, not its name (a digest streams through the file).
                "sources": [
                    {**s, "path": cache.path_digest(s["path"]) if Path(s["path"]).exists() else s["path"]}
                    for s in options["sources"]
                ],
                "tokenizer": tokenizer.fingerprint(),
                "template": (dataclasses.asdict(pair_template(options["template"])) if pairs
                             else template_identity(options["template"], options["tokenizer"])),
                **{k: v for k, v in options.items() if k not in ("sources", "tokenizer", "template")},
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


def _options(cfg: DataConfig, tokenizer_path: str | Path | None, pairs: bool = False) -> dict[str, Any]:
    """The settings that decide the tokenized result, checked (they also make up the cache key)."""
    tokenizer = str(tokenizer_path or cfg.tokenizer)
    cfg.check(tokenizer)
    sources = resolve_sources(cfg)
    if pairs:
        check_pair_options(cfg.train_on, cfg.template)
    return {
        **({"pairs": True, "max_target_tokens": cfg.max_target_tokens} if pairs else {}),
        "sources": sources,
        "tokenizer": tokenizer,
        "template": cfg.template,
        "mix_seed": cfg.mix_seed,
        "train_on": cfg.train_on,
        "rewritten_history": cfg.rewritten_history,
        "truncation": cfg.truncation,
        "max_tokens": cfg.max_tokens,
        "skip_bad_records": cfg.skip_bad_records,
    }


def tokenize_file(options: dict[str, Any], workers: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read, render and tokenize every record of every source, results in source and file order.

    Records stream from the files in chunks of CHUNK_RECORDS; chunks run in `workers` processes, at most
    two per worker in flight, so only the tokenized result is held in memory, not the records.
    """
    sources = [OpenSource(spec, options["skip_bad_records"]) for spec in options["sources"]]
    if len({s.format == "preference" for s in sources}) > 1:
        paths = ", ".join(s.spec["path"] for s in sources)
        raise DataError(f"{paths}: preference pairs (chosen / rejected) and SFT records cannot train in one "
                        "run", "config")
    if options.get("pairs") and sources[0].format == "preference":
        raise DataError(f"{sources[0].spec['path']}: preference records (chosen / rejected) train "
                        "decoder-only models; an encoder-decoder trains on (input, target) pairs (alpaca, "
                        "prompt_completion, messages or sharegpt records)", "config")
    common = {k: v for k, v in options.items() if k not in ("sources", "mix_seed")}
    jobs = [
        {**common, "path": s.spec["path"], "format": s.format, "field_map": s.spec["field_map"],
         "unit": s.unit}
        for s in sources
    ]
    tasks = (
        (index, copies, records)
        for index, source in enumerate(sources)
        for copies, records in source.chunks(CHUNK_RECORDS, index, options["mix_seed"])
    )
    first = list(itertools.islice(tasks, 2))
    tasks = itertools.chain(first, tasks)
    if workers > 1 and len(first) > 1:
        context = multiprocessing.get_context("fork")
        with context.Pool(workers, _init_worker, (jobs, 1)) as pool:
            results = list(_in_order(pool, tasks, 2 * workers))
    else:
        tokenize_chunk = _SourceTokenizers(jobs, threads=workers)
        results = [(index, copies, tokenize_chunk((index, records))) for index, copies, records in tasks]
    return _combine(results, options, sources)


def _in_order(
    pool: Any, tasks: Iterator[tuple[int, int, list]], window: int
) -> Iterator[tuple[int, int, dict]]:
    """(source index, copies, result) of each task, in order, with at most `window` tasks queued
    (Pool.imap would read the whole file ahead into its queue)."""
    pending: deque = deque()
    for index, copies, records in tasks:
        pending.append((index, copies, pool.apply_async(_run_chunk, ((index, records),))))
        if len(pending) >= window:
            index, copies, result = pending.popleft()
            yield index, copies, result.get()
    for index, copies, result in pending:
        yield index, copies, result.get()


class ChunkTokenizer:
    """Tokenizes chunks of raw records for one process (the tokenizer and template loaded once)."""

    def __init__(self, job: dict[str, Any], threads: int = 1) -> None:
        self.job = job
        self.fields = field_names(job["field_map"])
        self.tokenizer = load_tokenizer(job["tokenizer"], threads)
        self.format = make_chat_format(
            job["template"], job["tokenizer"], self.tokenizer, job["train_on"], job["rewritten_history"]
        )
        self.checks_left = fidelity.SAMPLES_CHECKED

    def describe(self) -> dict[str, Any]:
        """The template and the special-token ids used, for the data report."""
        tok = self.tokenizer
        return {
            "template": self.format.resolved,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "end_of_turn_ids": list(tok.end_of_turn_ids),
        }

    def __call__(self, chunk: list[tuple[int, Any]]) -> dict[str, Any]:
        """Tokenize one chunk of records (the first ones of this process are also checked by fidelity.py)."""
        job, max_tokens = self.job, self.job["max_tokens"]
        checks: list = []
        errors: list[tuple[int, DataError]] = []
        rendered, wheres, numbers = [], [], []
        for number, raw in chunk:
            where = location(job["path"], number, job["unit"])
            try:
                conv = to_conversation(decode_record(where, raw), job["format"], self.fields, where)
                samples = self.format.render(conv, where)
            except DataError as e:
                errors.append((number, e))
                continue
            if len(samples) == 1 and len(checks) < self.checks_left:
                checks.append((len(rendered), self.format.render.messages(conv)))
            rendered += samples
            wheres += [where] * len(samples)
            numbers += [number] * len(samples)
        dropped, truncated = Counter(), Counter()
        straddling = 0
        ids_out: list[int] = []
        mask_out: list[bool] = []
        lengths, kept_numbers = [], []
        encoded = self.format.encoder.encode_samples(rendered, wheres)
        checked = fidelity.check_samples(
            self.tokenizer, job["tokenizer"],
            [(wheres[k], messages, rendered[k], encoded[k].ids) for k, messages in checks
             if not isinstance(encoded[k], DataError)],
            self.format.encoder.find_controls,
        )
        self.checks_left -= len(checks)
        for number, result in zip(numbers, encoded, strict=True):
            if isinstance(result, DataError):
                errors.append((number, result))
                continue
            ids, mask, straddles = result
            straddling += straddles > 0
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
        kept_errors = settle_errors(errors, job["skip_bad_records"], dropped)
        return {
            "tokens": np.array(ids_out, dtype=np.int32),
            "mask": np.array(mask_out, dtype=bool),
            "lengths": np.array(lengths, dtype=np.int64),
            "lines": np.array(kept_numbers, dtype=np.int64),
            "dropped": dropped,
            "truncated": truncated,
            "straddling": straddling,
            "fidelity_checked": checked,
            "chat_format": self.describe(),
            "errors": kept_errors,
        }


class _SourceTokenizers:
    """Tokenizes (source index, records) tasks: one ChunkTokenizer per source (its own format and
    fields), made on first use."""

    def __init__(self, jobs: list[dict[str, Any]], threads: int) -> None:
        self.jobs, self.threads = jobs, threads
        self.tokenizers: dict[int, ChunkTokenizer] = {}

    def __call__(self, task: tuple[int, list[tuple[int, Any]]]) -> dict[str, Any]:
        index, records = task
        if index not in self.tokenizers:
            job = self.jobs[index]
            kind = PairChunkTokenizer if job.get("pairs") else ChunkTokenizer
            if job["format"] == "preference":
                from packtune.preference.data import PairTokenizer as kind
            self.tokenizers[index] = kind(job, self.threads)
        return self.tokenizers[index](records)


_WORKER: dict[str, _SourceTokenizers] = {}


def _init_worker(jobs: list[dict[str, Any]], threads: int) -> None:
    _WORKER["tokenize"] = _SourceTokenizers(jobs, threads)


def _run_chunk(task: tuple[int, list[tuple[int, Any]]]) -> dict[str, Any]:
    return _WORKER["tokenize"](task)


def _repeat(result: dict[str, Any], copies: int) -> dict[str, Any]:
    """A chunk's result with every sample (and every drop and truncation) counted `copies` times."""
    if copies == 1:
        return result
    tiled = {k: np.tile(result[k], copies) for k in ("tokens", "mask", "lengths", "lines", "prompt_lengths")
             if k in result}
    counts = {k: Counter({r: n * copies for r, n in result[k].items()}) for k in ("dropped", "truncated")}
    return {**result, **tiled, **counts}


def _combine(
    tagged: list[tuple[int, int, dict[str, Any]]], options: dict[str, Any], sources: list[OpenSource]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    per_source = [
        {"path": s.spec["path"], "format": s.format, "weight": s.spec["weight"],
         "read": s.read, "rows": s.records, "kept": 0}
        for s in sources
    ]
    results = []
    for index, copies, result in tagged:
        result = _repeat(result, copies)
        per_source[index]["kept"] += len(result["lengths"])
        results.append(result)
    n_records = sum(s.records for s in sources)
    tokens = np.concatenate([r["tokens"] for r in results]).astype(np.int32, copy=False)
    mask = np.concatenate([r["mask"] for r in results])
    lengths = np.concatenate([r["lengths"] for r in results])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(lengths) == 0:
        raise DataError(
            f"{', '.join(s['path'] for s in per_source)}: no sample was kept out of {n_records} records "
            f"(dropped: {dict(sum((r['dropped'] for r in results), Counter()))})",
            "no_samples",
        )
    trained = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    label_counts = trained[offsets[1:]] - trained[offsets[:-1] + 1]
    dropped = sum((r["dropped"] for r in results), Counter())
    truncated = sum((r["truncated"] for r in results), Counter())
    n_label = int(label_counts.sum())
    report = {
        "rows": n_records,  # the --report-json keys stay as they were: "rows" counts records read
        "kept": len(lengths),
        "dropped": dict(sorted(dropped.items())),
        "truncated": dict(sorted(truncated.items())),
        "tokens": int(len(tokens)),
        "label_tokens": n_label,
        "label_share": n_label / max(len(tokens), 1),
        "format": "+".join(dict.fromkeys(s.format for s in sources)),
        **results[0]["chat_format"],
        "rows_with_straddling_tokens": sum(r["straddling"] for r in results),
        "rows_checked_against_reference": sum(r["fidelity_checked"] for r in results),
        "max_tokens": options["max_tokens"],
        "errors": [e for r in results for e in r["errors"]][:MAX_ERRORS_KEPT],
        "sources": per_source,
    }
    arrays = {
        "tokens": tokens,
        "mask": mask,
        "offsets": offsets,
        "lines": np.concatenate([r["lines"] for r in results]),
        "label_counts": label_counts,
    }
    if sources[0].format == "preference":
        arrays["prompt_lengths"] = np.concatenate([r["prompt_lengths"] for r in results])
        report["pairs"] = len(arrays["prompt_lengths"])
    return arrays, report
