"""A tokenizing chunk's bad records: stop at the first, or count them and keep going.

Every chunk tokenizer (single samples, encoder-decoder pairs, preference pairs) collects
`(line number, DataError)` for the records it could not use and settles them here the same way.
"""

from __future__ import annotations

from collections import Counter

from packtune.errors import DataError

MAX_ERRORS_KEPT = 5
"""Messages of skipped records kept per chunk (and per run) for the data report."""


def settle_errors(errors: list[tuple[int, DataError]], skip_bad_records: bool, dropped: Counter) -> list[str]:
    """Raise the first bad record (by line) unless `skip_bad_records`; else count each under its
    reason in `dropped` and return the first MAX_ERRORS_KEPT messages."""
    errors.sort(key=lambda item: item[0])
    if errors and not skip_bad_records:
        raise errors[0][1]
    for _, e in errors:
        dropped[e.reason] += 1
    return [str(e) for _, e in errors[:MAX_ERRORS_KEPT]]
