"""The one exception the data pipeline raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the training data or tokenizer that the user must fix.

    The message names the file and line (and the field) at fault. `reason` is a short stable key
    (`malformed_json`, `missing_field`, ...) under which `skip_bad_records` counts skipped records.
    """

    def __init__(self, message: str, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (DataError, (str(self), self.reason))
