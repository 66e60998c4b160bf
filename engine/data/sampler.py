"""A deterministic, resumable sampler: per optimizer step, one rank's list of micro-batches.

Rows are shuffled per epoch with a generator seeded by (seed, epoch) into one global order, then
dealt out in groups of `world_size * micro_batches` rows: the group starting at `rows_dealt`
gives rank r the rows `perm[rows_dealt + r*m : rows_dealt + (r+1)*m]`. The number of rows is first
made a multiple of the group size by splitting rows (never by dropping or repeating samples), so
every rank runs the same number of steps and every kept sample is seen exactly once per epoch.

The state is the epoch and `rows_dealt`, the number of rows of the global order already dealt out
(over all ranks), plus a fingerprint of the rows. It does not depend on the rank or on how rows
are grouped, so a run saved by 2 ranks with m micro-batches resumes in 1 process with 2m
micro-batches (any world size x micro-batches with the same product: the row split is the same).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class PackedSampler:
    def __init__(
        self, packed_rows, *, seed: int, rank: int = 0, world_size: int = 1, micro_batches: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.group = world_size * micro_batches
        self.rows = packed_rows.with_row_multiple(self.group)
        self.seed, self.rank, self.world_size, self.micro_batches = seed, rank, world_size, micro_batches
        self.epoch = 0
        self.rows_dealt = 0
        """Rows of this epoch's global order already dealt out, over all ranks."""

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.group

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first step (no-op when already in that epoch, e.g. after a resume)."""
        if epoch != self.epoch:
            self.epoch, self.rows_dealt = epoch, 0

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def __iter__(self) -> Iterator[list]:
        """Micro-batch lists from the current step to the end of the epoch; the next epoch follows."""
        perm = self.permutation(self.epoch)
        while self.rows_dealt + self.group <= len(self.rows):
            start = self.rows_dealt + self.rank * self.micro_batches
            batches = [self.rows.collate(int(r)) for r in perm[start : start + self.micro_batches]]
            self.rows_dealt += self.group
            yield batches
        self.epoch, self.rows_dealt = self.epoch + 1, 0

    def _fingerprint(self) -> list[int]:
        return [len(self.rows), int(self.rows.row_tokens.sum())]

    def state_dict(self) -> dict[str, Any]:
        """Plain ints: the epoch, the rows already dealt out in it, seed, fingerprint and the group
        (world_size x micro_batches) the rows were split for."""
        return {"epoch": self.epoch, "rows_dealt": self.rows_dealt, "seed": self.seed,
                "fingerprint": self._fingerprint(), "group": self.group}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = _current_keys(state)
        group = state.get("group")
        if group not in (None, self.group):  # another global batch: not the run it resumes
            raise ValueError(f"the rows were split for world_size x micro_batches = {group}, now "
                             f"{self.world_size} x {self.micro_batches} = {self.group}; "
                             f"{_resumes_with(group, self.world_size)}")
        if list(state["fingerprint"]) != self._fingerprint() or state["seed"] != self.seed:
            raise ValueError(
                "sampler state is from different data or seed, or rows split for another "
                "world_size x micro_batches "
                f"(saved {state['fingerprint']} seed {state['seed']}, "
                f"now {self._fingerprint()} seed {self.seed})"
            )
        if state["rows_dealt"] % self.group:
            raise ValueError(f"the saved rows dealt ({state['rows_dealt']}) are not a multiple of "
                             f"world_size x micro_batches = {self.group}")
        self.epoch, self.rows_dealt = int(state["epoch"]), int(state["rows_dealt"])


def _resumes_with(group: int, world_size: int) -> str:
    rank = "rank" if world_size == 1 else "ranks"
    if group % world_size:
        return (f"no micro_batches resumes it on {world_size} {rank} ({group} is not a multiple of "
                f"{world_size})")
    return f"on {world_size} {rank} resume with train.micro_batches = {group // world_size}"


def _current_keys(state: dict[str, Any]) -> dict[str, Any]:
    """A saved sampler state under today's keys. Checkpoints written before `rows_dealt` had its
    name call it "position"; older ones saved "step", steps of the epoch taken by the world_size x
    micro_batches that end their fingerprint (ranks could not change then)."""
    if "rows_dealt" in state:
        return state
    if "position" in state:
        return {**state, "rows_dealt": state["position"]}
    *fingerprint, world_size, micro_batches = state["fingerprint"]
    return {**state, "rows_dealt": state["step"] * world_size * micro_batches, "fingerprint": fingerprint}
