"""Instruction data -> packed, loss-masked batches (see docs/how-it-works.md).

readers (files -> streamed records) -> sources (several files, mixed by weight)
-> formats (records -> Conversation) -> chat_format (the model's Jinja chat template, jinja_template,
or a built-in one, builtin_templates: -> text and trained spans) -> encoding (-> ids + mask, checked)
-> dataset (tokenize once, cached, memory-mapped) -> packing (best-fit decreasing rows, batches)
-> rows (held-out split, rows of a run) -> sampler (deterministic, resumable, sharded per rank)
-> report (printed before step 1)."""

from packtune.data.dataset import TokenizedDataset, prepare_dataset
from packtune.data.packing import PackedBatch, PackedRows, PaddedBatch, PaddedRows, best_fit_decreasing
from packtune.data.report import data_report, format_report
from packtune.data.sampler import PackedSampler
from packtune.errors import DataError

__all__ = [
    "DataError",
    "PackedBatch",
    "PackedRows",
    "PackedSampler",
    "PaddedBatch",
    "PaddedRows",
    "TokenizedDataset",
    "best_fit_decreasing",
    "data_report",
    "format_report",
    "prepare_dataset",
]
