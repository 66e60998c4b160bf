"""Instruction data -> packed, loss-masked batches (see docs/how-it-works.md).

readers (files -> streamed records) -> sources (several files, mixed by weight)
-> formats (records -> Conversation) -> templates (-> segments) -> tokenize (-> ids + mask, checked)
-> dataset (tokenize once, cached, memory-mapped) -> packing (best-fit decreasing rows, batches)
-> sampler (deterministic, resumable, sharded per rank) -> report (printed before step 1).
"""

from packtune.data.dataset import TokenizedDataset, prepare_dataset
from packtune.data.errors import DataError
from packtune.data.packing import PackedBatch, PackedRows, PaddedBatch, PaddedRows, best_fit_decreasing
from packtune.data.report import data_report, format_report
from packtune.data.sampler import PackedSampler

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
