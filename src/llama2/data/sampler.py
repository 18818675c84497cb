"""Deterministic, resumable, rank-sharded batches over any map-style dataset (`len` and `[i]`).

The order is defined for the whole job, not per process: epoch `e` visits the examples in the permutation
drawn from `(seed, e)`, and global batch `k` is the `global_batch_size` examples at `[k·G, (k+1)·G)` of it.
Each process takes its own slice of every round of `world_size × micro_batch_size` examples. The state is
therefore just `(seed, epoch, cursor)` — the sampler's whole random state — and it is the same on every
process and for any number of processes, so a run resumes exactly, even on a different `world_size`.

Given example lengths, batches are grouped by length (as `transformers`' `group_by_length`): the epoch's
permutation is cut into groups of `length_group` global batches, each group is sorted by length and cut
into global batches, and the global batches are shuffled. Padded batches (reward-model pairs) then hold
examples of similar length: on the toy world's preference pairs this halves the padded tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


class ShuffledBatches(Generic[T]):
    """An endless iterator of this process's micro-batches, `collate([dataset[i] for i in ...])`."""

    def __init__(
        self,
        dataset: Sequence[T],
        collate: Callable[[list[T]], Any],
        micro_batch_size: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        length_group: int = 32,
    ):
        round_size = micro_batch_size * world_size
        if global_batch_size % round_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not a multiple of micro batch size × processes "
                f"({micro_batch_size} × {world_size} = {round_size})"
            )
        if len(dataset) < global_batch_size:
            raise ValueError(
                f"the dataset holds {len(dataset)} examples, fewer than one global batch ({global_batch_size})"
            )
        self.dataset, self.collate = dataset, collate
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} examples")
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.length_group = length_group
        self.seed, self.epoch, self.cursor = seed, 0, 0
        # Whole global batches only, so an epoch ends at the same example for every world size.
        self._epoch_len = len(dataset) // global_batch_size * global_batch_size
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            n = len(self.dataset)
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            if self.lengths is not None:
                self._order = self._group_by_length(self._order, rng)
        return self._order

    def _group_by_length(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g = self.global_batch_size
        batches = []
        for start in range(0, self._epoch_len, g * self.length_group):
            group = order[start : min(start + g * self.length_group, self._epoch_len)]
            group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches += [group[i : i + g] for i in range(0, len(group), g)]
        shuffled = [batches[i] for i in rng.permutation(len(batches))] if self.shuffle else batches
        return np.concatenate([*shuffled, order[self._epoch_len :]])

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.cursor >= self._epoch_len:
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        start = self.cursor + self.rank * self.micro_batch_size
        indices = self._epoch_order()[start : start + self.micro_batch_size]
        self.cursor += self.micro_batch_size * self.world_size
        return self.collate([self.dataset[int(i)] for i in indices])

    @property
    def examples_drawn(self) -> int:
        """Examples drawn by all processes since the first epoch began: global batches × their size."""
        return self.epoch * self._epoch_len + self.cursor

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume where `state` left off; a cursor between global batches would break exactness."""
        if state["cursor"] % self.global_batch_size:
            raise ValueError(f"data cursor {state['cursor']} is not at a global batch boundary")
        self.seed, self.epoch, self.cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
        self._order = None


def sequential_batches(
    dataset: Sequence[T],
    collate: Callable[[list[T]], Any],
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Any]:
    """One pass in order (validation). Every process yields the same number of batches, which FSDP needs:
    each forward is a collective, so a process with one batch more would wait forever."""
    rounds = len(dataset) // (micro_batch_size * world_size)
    for r in range(rounds):
        start = (r * world_size + rank) * micro_batch_size
        yield collate([dataset[i] for i in range(start, start + micro_batch_size)])
