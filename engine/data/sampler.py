"""A deterministic, resumable sampler: per optimizer step, one rank's list of micro-batches.

Rows are shuffled per epoch with a generator seeded by (seed, epoch), then dealt out in steps of
`world_size * micro_batches` rows: step s, rank r takes rows `perm[s*G + r*m : s*G + (r+1)*m]`.
The number of rows is first made a multiple of G by splitting rows (never by dropping or
repeating samples), so every rank runs the same number of steps and every kept sample is seen
exactly once per epoch. The state is two ints (epoch, step) plus a fingerprint that catches a
resume with different data or a different world size.

Because every rank holds the full row table, the global label-token count of a step (the loss
denominator under token loss weighting) is known on the host without an all-reduce:
`global_label_tokens()`.
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
        self.epoch, self.step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.group

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first step (no-op when already in that epoch, e.g. after a resume)."""
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def step_rows(self, step: int, rank: int | None = None, epoch: int | None = None) -> np.ndarray:
        """Row indices of rank `rank` (default: this rank) at `step` of `epoch` (default: current)."""
        rank = self.rank if rank is None else rank
        perm = self.permutation(self.epoch if epoch is None else epoch)
        start = step * self.group + rank * self.micro_batches
        return perm[start : start + self.micro_batches]

    def global_label_tokens(self, step: int | None = None) -> int:
        """Label tokens of every micro-batch on every rank in `step` (default: the next step)."""
        step = self.step if step is None else step
        perm = self.permutation(self.epoch)
        return int(self.rows.row_label_tokens[perm[step * self.group : (step + 1) * self.group]].sum())

    def __iter__(self) -> Iterator[list]:
        """Micro-batch lists from the current step to the end of the epoch; the next epoch follows."""
        perm = self.permutation(self.epoch)
        while self.step < self.steps_per_epoch:
            start = self.step * self.group + self.rank * self.micro_batches
            batches = [self.rows.collate(int(r)) for r in perm[start : start + self.micro_batches]]
            self.step += 1
            yield batches
        self.epoch, self.step = self.epoch + 1, 0

    def _fingerprint(self) -> list[int]:
        return [len(self.rows), int(self.rows.row_tokens.sum()), self.world_size, self.micro_batches]

    def state_dict(self) -> dict[str, Any]:
        """Plain ints: the epoch, the number of steps already taken in it, seed and fingerprint."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["fingerprint"]) != self._fingerprint() or state["seed"] != self.seed:
            raise ValueError(
                "sampler state is from different data, seed, world size or micro-batches "
                f"(saved {state['fingerprint']} seed {state['seed']}, now "
                f"{self._fingerprint()} seed {self.seed})"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
