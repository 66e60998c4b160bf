"""The graceful stop of a training run: SIGTERM (a scheduler's preemption, `kill`) or Ctrl-C asks the
loop to finish the step it is in, save a checkpoint and exit 0, so the run resumes where it stopped."""

from __future__ import annotations

import signal
from typing import Any


class StopSignal:
    """SIGTERM/SIGINT ask the loop to finish the current step, save and exit 0.

    A second SIGINT falls through to Python's default (KeyboardInterrupt) for an impatient user.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
