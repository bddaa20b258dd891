"""Resumable batching: a crash mid-epoch resumes on the very next unseen batch.

Lightning restores a mid-epoch checkpoint's loop counters, but a plain shuffled DataLoader would
restart its epoch from a fresh permutation, silently repeating some examples and skipping others.
`ResumableShuffleSampler` draws one permutation per (seed, epoch), so an epoch's order is known
again after a restart, and `ResumableDataLoader` implements Lightning's `state_dict` /
`load_state_dict` interface: it records the epoch and how many batches the training loop has
processed (read from the loop, not from the loader, whose prefetching runs ahead), and on restore
skips exactly those.

Under DDP the sampler shards itself (`num_replicas`, `rank`): every rank draws the same global order
of micro-batches and takes every `num_replicas`-th one, so the ranks' shards are disjoint, together
they are the whole epoch, and each rank's micro-batches keep their length grouping. When the
micro-batches do not divide evenly, the first ones are repeated to fill the last round (as
torch's DistributedSampler does; `padded_items` counts them): every rank must run the same number
of steps, or the gradient all-reduce would wait forever.

Validation is sharded the same way but fills the last round with empty micro-batches that weigh
nothing (`ShardedEvalBatches`): a repeated example would bias the validation mean, which is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableShuffleSampler(Sampler[int]):
    """One seeded permutation per epoch; with `lengths` and `group_size`, length-grouped.

    Length grouping (as in Hugging Face's LengthGroupedSampler): shuffle, cut into mega-batches of
    `group_size` examples, sort each by length, and shuffle the order of the micro-batches, so a
    micro-batch holds examples of similar length and wastes little padding, while epochs still
    visit the data in a random order.
    """

    def __init__(
        self,
        num_items: int,
        seed: int = 0,
        shuffle: bool = True,
        lengths: list[int] | None = None,
        batch_size: int = 1,
        group_size: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of the {num_replicas} replicas")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = lengths
        self.batch_size = batch_size
        self.group_size = group_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, items of this rank's shard already trained)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, items_done: int) -> None:
        self.epoch = epoch
        self._resume = (epoch, items_done)

    def order(self, epoch: int) -> list[int]:
        """The epoch's global order of items (every rank's shard comes from it)."""
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        if not self.lengths or self.group_size <= 1:
            return order
        batches = []
        for start in range(0, len(order), self.group_size):
            group = sorted(order[start : start + self.group_size], key=lambda i: -self.lengths[i])
            batches.extend(group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size))
        # only full batches are shuffled: a short one in the middle would shift every later batch
        # boundary of the DataLoader and mix lengths again
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [b for b in batches if len(b) != self.batch_size]
        shuffled = torch.randperm(len(full), generator=generator).tolist()
        return [i for b in shuffled for i in full[b]] + [i for b in partial for i in b]

    def _rounds(self, epoch: int) -> list[list[int]]:
        """The epoch's micro-batches in rounds of one per rank, the last round filled with the first ones."""
        order = self.order(epoch)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        missing = -len(batches) % self.num_replicas
        return batches + [batches[i % len(batches)] for i in range(missing)] if batches else []

    @property
    def padded_items(self) -> int:
        """Items repeated per epoch so that every rank runs the same number of micro-batches."""
        return sum(len(b) for b in self._rounds(self.epoch)) - self.num_items

    def shard(self, epoch: int) -> list[int]:
        """This rank's items of the epoch: micro-batches rank, rank + R, rank + 2R, ... of the global
        order (R replicas). Only the epoch's last micro-batch may be short, and it is its rank's last."""
        if self.num_replicas == 1:
            return self.order(epoch)
        return [i for b in self._rounds(epoch)[self.rank :: self.num_replicas] for i in b]

    def __iter__(self) -> Iterator[int]:
        # read the skip lazily: Lightning creates the iterator before it restores loader states.
        # It applies to the resumed epoch only: a checkpoint from an epoch's last batch resumes
        # into the next epoch, which starts from its beginning.
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == self.epoch else 0
        yield from self.shard(self.epoch)[skip:]

    def __len__(self) -> int:
        return self.num_items if self.num_replicas == 1 else len(self.shard(self.epoch))


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


class ShardedEvalBatches(Sampler[list[int]]):
    """This rank's validation micro-batches: a batch sampler over a split kept in its order.

    The split is cut into micro-batches of `batch_size` examples; rank r takes micro-batches r,
    r + R, r + 2R, ... (R replicas), so the ranks' shards are disjoint and together the whole split.
    Every rank must run the same number of forwards (under FSDP each forward is a collective, and a
    rank with one batch fewer would leave the others waiting), so a rank with one fewer ends with an
    empty micro-batch `[]`, which the collator (palign/data/sft.py: SFTCollator) turns into a batch
    without a supervised token: it weighs nothing in the token-weighted loss and accuracy, where a
    repeated real example (what torch's DistributedSampler pads with) would count twice.
    """

    def __init__(self, num_items: int, batch_size: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of the {num_replicas} replicas")
        batches = [list(range(i, min(i + batch_size, num_items))) for i in range(0, num_items, batch_size)]
        own = batches[rank::num_replicas]
        self.batches = own + [[]] * (-(-len(batches) // num_replicas) - len(own))

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)


def pack_examples(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Greedy first-fit-decreasing bins of example indices whose lengths sum to <= capacity.

    Deterministic for a given seed (ties broken by a seeded shuffle), so a resumed run packs the
    same rows. Every example fits (over-length ones were dropped at tokenization).
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    order.sort(key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        if lengths[index] > capacity:
            raise ValueError(f"example {index} has {lengths[index]} tokens, more than the packing capacity {capacity}")
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins
