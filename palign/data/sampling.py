"""Resumable batching: a crash mid-epoch resumes on the very next unseen batch.

Lightning restores a mid-epoch checkpoint's loop counters, but a plain shuffled DataLoader would
restart its epoch from a fresh permutation, silently repeating some examples and skipping others.
`ResumableShuffleSampler` draws one permutation per (seed, epoch), so an epoch's order is known
again after a restart, and `ResumableDataLoader` implements Lightning's `state_dict` /
`load_state_dict` interface: it records the epoch and how many batches the training loop has
processed (read from the loop, not from the loader, whose prefetching runs ahead), and on restore
skips exactly those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableShuffleSampler(Sampler[int]):
    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True):
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, items_done: int) -> None:
        self.epoch = epoch
        self._skip = items_done

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        # read the skip lazily: Lightning creates the iterator before it restores loader states
        skip, self._skip = self._skip, 0
        yield from self.order(self.epoch)[skip:]

    def __len__(self) -> int:
        return self.num_items


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableShuffleSampler` that Lightning can checkpoint and restore."""

    def __init__(self, *args: Any, batches_done: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableShuffleSampler):
            raise TypeError("ResumableDataLoader needs a ResumableShuffleSampler")
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        done = self.batches_done() if self.batches_done else 0
        return {"epoch": self.sampler.epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches_done"] * int(self.batch_size or 1))
