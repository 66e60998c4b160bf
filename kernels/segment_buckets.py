"""Length buckets: the CPU attention paths' way of running many packed segments as a few batched
SDPA calls. Segments are sorted by length and cut into buckets whose padding to the bucket's
longest costs at most `BUCKET_WASTE` x their real tokens; each bucket's segments are gathered into
`[B, L, ...]` (padded by repeating a segment's last token), attended, and the real rows written
back. Used by the causal varlen attention (attention.py), T5's relative attention
(relative_attention.py) and attention over separate query and key segments (qk_attention.py).
"""

from __future__ import annotations

import torch

BUCKET_WASTE = 1.25
"""A bucket's padded tokens (samples x its longest) stay within this multiple of its real tokens."""


def length_buckets(lengths: list[int], waste: float = BUCKET_WASTE) -> list[list[int]]:
    """Sample indices grouped longest first; each group padded to its first (longest) sample holds at
    most `waste` x its real tokens. Empty samples are left out."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    tokens = 0
    for i in order:
        if buckets and lengths[buckets[-1][0]] * (len(buckets[-1]) + 1) <= waste * (tokens + lengths[i]):
            buckets[-1].append(i)
            tokens += lengths[i]
        else:
            buckets.append([i])
            tokens = lengths[i]
    return buckets


def padded_segment_index(starts: list[int], lengths: list[int], device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices `[B, longest]` of segments padded to the longest by repeating each one's last
    token, and which of them are real: the gather of a length bucket's segments."""
    start = torch.tensor(starts, device=device)[:, None]
    length = torch.tensor(lengths, device=device)[:, None]
    offset = torch.arange(max(lengths), device=device)[None, :]
    return start + torch.minimum(offset, length - 1), offset < length


def gather_segments(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows of `t` `[T, ...]` at a bucket's `index` `[B, L]`: `[B, L, ...]`. An index_select, whose
    backward adds into the gradient with index_add; `t[index]` would scatter it with index_put's
    accumulate, which sorts the indices first (several times slower on the CPU at small shapes)."""
    return t.index_select(0, index.flatten()).unflatten(0, tuple(index.shape))


def real_rows(padded: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The real rows of a bucket's output `padded` `[B, L, ...]` (where `real` `[B, L]` is True), in order:
    as `padded[real]`, through index_select (see `gather_segments`)."""
    return padded.flatten(0, 1).index_select(0, real.flatten().nonzero().squeeze(1))


def scatter_segments(like: torch.Tensor, rows: list[torch.Tensor], parts: list[torch.Tensor]) -> torch.Tensor:
    """The buckets' outputs `parts` written back at their token `rows`; rows no segment covers are zero.

    A gather, each token reading its row of the parts (or an appended zero row), whose backward keeps
    only that int64 index: `index_copy` keeps its whole source (a second `[tokens x heads x dim]`
    copy of the output, per layer, alive until the backward) for its shape alone."""
    if not parts:
        return torch.zeros_like(like)
    rows_cat = torch.cat(rows)
    source = torch.cat([*parts, parts[0].new_zeros(1, *parts[0].shape[1:])])
    where = torch.full((like.shape[0],), rows_cat.numel(), dtype=torch.int64, device=like.device)
    where[rows_cat] = torch.arange(rows_cat.numel(), device=like.device)
    return source.index_select(0, where)
