"""The LightningDataModule: teacher records -> (truncation -> alignment) -> SFT tokens.

`prepare_data` loads the teacher source, splits off a validation set, runs the stages the baseline
needs (the truncation module finds each trace's minimal sufficient prefix; the alignment module has
the student continue it), builds the supervision targets and tokenizes them into a fingerprinted
cache. The pipeline runs it before the Trainer starts; every cache it fills is locked against
concurrent writers, so DDP ranks (and SLURM tasks sharing a cache) never repeat the expensive
stages: one computes, the others wait for it and read the result.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch.utils.data
from torch.utils.data import DataLoader

from palign.data.sampling import ResumableDataLoader, ResumableShuffleSampler, ShardedEvalBatches, pack_examples
from palign.data.sft import PackedSFTCollator, SFTCollator, SupervisedExample, TokenizedSplit, build_tokenized_split
from palign.data.supervision import build_targets
from palign.teachers.records import TeacherRecord
from palign.teachers.sources import Teacher

log = logging.getLogger(__name__)

# Stage hooks the pipeline plugs in: records -> {record id: text}.
PrefixStage = Callable[[Sequence[TeacherRecord]], Mapping[str, str]]
ContinuationStage = Callable[[Sequence[TeacherRecord], Mapping[str, str] | None], Mapping[str, str]]


def split_records(
    records: Sequence[TeacherRecord], val_size: int, seed: int, skipped: Mapping[str, int] | None = None
) -> tuple[list[TeacherRecord], list[TeacherRecord]]:
    """Deterministic (train, val) split by a seeded shuffle of record ids."""
    if not records:
        raise ValueError(
            f"no usable teacher records (skipped: {dict(skipped or {})}); check the teacher source "
            "(teacher.source.*), e.g. teacher.source.only_correct=false when few traces are graded correct"
        )
    order = sorted(records, key=lambda r: r.id)
    random.Random(seed).shuffle(order)
    if val_size >= len(order):
        raise ValueError(
            f"only {len(order)} teacher records: cannot keep {val_size} for validation; "
            "lower data.val_size or raise teacher.source.limit"
        )
    return order[val_size:], order[:val_size]


class PrefixAlignmentDataModule(pl.LightningDataModule):
    def __init__(
        self,
        teacher: Teacher,
        tokenizer,
        prompts: Mapping[str, Any],
        target: str,
        cache_dir: str,
        max_length: int,
        micro_batch_size: int,
        val_size: int,
        train_limit: int | None,
        seed: int,
        num_workers: int,
        packing: bool,
        pack_length: int | None,
        group_by_length: bool,
        markers: Mapping[str, str] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        prefix_stage: PrefixStage | None = None,
        continuation_stage: ContinuationStage | None = None,
    ):
        super().__init__()
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.prompts = dict(prompts)
        self.target = target
        self.cache_dir = cache_dir
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.val_size = val_size
        self.train_limit = train_limit
        self.seed = seed
        self.markers = dict(markers or {})
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.num_workers = num_workers
        self.packing = packing
        self.pack_length = pack_length or max_length
        self.group_by_length = group_by_length
        self.prefix_stage = prefix_stage
        self.continuation_stage = continuation_stage
        self.splits: dict[str, TokenizedSplit] = {}
        self.stats: dict[str, Any] = {}
        self._datasets: dict[str, Any] = {}

    # -- stages ---------------------------------------------------------------------------------
    def load_records(self) -> tuple[list[TeacherRecord], list[TeacherRecord]]:
        data = self.teacher.load()
        train, val = split_records(data.records, self.val_size, self.seed, data.skipped)
        if self.train_limit is not None:
            train = train[: self.train_limit]
        self.stats["teacher_records"] = len(data.records)
        self.stats["teacher_skipped"] = dict(data.skipped)
        return train, val

    def build_examples(self, records: Sequence[TeacherRecord]) -> tuple[list[SupervisedExample], Counter]:
        prefixes = self.prefix_stage(records) if self.prefix_stage else None
        continuations = self.continuation_stage(records, prefixes) if self.continuation_stage else None
        return build_targets(records, self.target, prefixes, continuations, self.markers)

    def prepare_data(self) -> None:
        """Stages 1 and 2 and tokenization, each cached (and locked against concurrent writers) under
        `cache_dir`. The pipeline calls it before the Trainer starts, so under DDP the processes
        Lightning launches (and every rank of a SLURM job) find the work done; Lightning's own call
        is then a no-op."""
        if self.splits:
            return
        train, val = self.load_records()
        for split, records in (("train", train), ("val", val)):
            if not records:
                continue
            examples, skipped = self.build_examples(records)
            if split == "train" and not examples:
                raise RuntimeError(
                    f"no training examples left for target '{self.target}' (skipped: {dict(skipped)}); "
                    "a small student rarely continues correctly: give it more tokens "
                    "(alignment.sampling.max_new_tokens), more problems, "
                    "or keep every continuation (alignment.filter=none)"
                )
            tokenized = build_tokenized_split(
                examples,
                self.tokenizer,
                self.prompts,
                self.max_length,
                self.cache_dir,
                split,
                self.chat_template_kwargs,
            )
            if split == "train" and tokenized.kept == 0:
                raise RuntimeError(
                    f"all {tokenized.dropped_too_long} training examples are longer than data.max_length="
                    f"{self.max_length} tokens; raise data.max_length"
                )
            if tokenized.kept == 0:  # validation only: every example too long
                log.warning(
                    "%s: all %d examples are longer than data.max_length=%d tokens; no validation loss",
                    split,
                    tokenized.dropped_too_long,
                    self.max_length,
                )
            else:
                self.splits[split] = tokenized
            self.stats[f"{split}/examples"] = tokenized.kept
            self.stats[f"{split}/dropped_too_long"] = tokenized.dropped_too_long
            self.stats[f"{split}/skipped"] = dict(skipped)
            self.stats[f"{split}/response_tokens"] = tokenized.response_tokens

    def setup(self, stage: str | None = None) -> None:
        import datasets

        self.prepare_data()  # a no-op where it ran in this process
        for split, tokenized in self.splits.items():
            self._datasets[split] = datasets.load_from_disk(str(tokenized.path)).with_format(
                None, columns=["input_ids", "labels"]
            )

    # -- loaders --------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Shuffled micro-batches: length-grouped rows of examples, or, with `packing`, bins of
        examples flattened into one row per micro-batch."""
        trainer = self.trainer
        loader = train_loader(
            self._datasets["train"],
            self.tokenizer.pad_token_id,
            self.micro_batch_size,
            self.seed,
            packing=self.packing,
            pack_length=self.pack_length,
            group_by_length=self.group_by_length,
            num_workers=self.num_workers,
            batches_done=self._train_batches_done,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )
        if self.packing:
            self.stats["train/packed_bins"] = len(loader.dataset)
        self.stats["train/padded_per_epoch"] = loader.sampler.padded_items
        return loader

    def _train_batches_done(self) -> int:
        """Batches of the current epoch the training loop has fully processed."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self):
        """This rank's shard of the validation micro-batches, in order, evened out across ranks with
        batches that weigh nothing (palign/data/sampling.py: ShardedEvalBatches); the token-weighted
        loss and accuracy are reduced over the ranks (the module's torchmetrics), so they are the
        whole split's, as one process would compute them."""
        if "val" not in self._datasets:
            return []
        trainer = self.trainer
        batches = ShardedEvalBatches(
            len(self._datasets["val"]),
            self.micro_batch_size,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )
        return DataLoader(
            self._datasets["val"],
            batch_sampler=batches,
            collate_fn=SFTCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )


def train_loader(
    dataset,
    pad_token_id: int,
    micro_batch_size: int,
    seed: int,
    *,
    packing: bool = False,
    pack_length: int | None = None,
    group_by_length: bool = True,
    num_workers: int = 0,
    batches_done: Callable[[], int] | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> ResumableDataLoader:
    """The resumable training loader over tokenized examples: shuffled micro-batches of examples
    grouped by length (`group_by_length`), or, with `packing`, of `micro_batch_size` bins of up to
    `pack_length` tokens each, flattened into one padding-free row (palign/data/sft.py:
    PackedSFTCollator); under DDP, this rank's shard of them (palign/data/sampling.py)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    shard = {"batch_size": micro_batch_size, "num_replicas": num_replicas, "rank": rank}
    if packing:
        if not pack_length:
            raise ValueError("packing needs pack_length (tokens per packed bin)")
        rows = PackedRows(dataset, pack_examples(lengths, pack_length, seed=seed))
        return ResumableDataLoader(
            rows,
            batch_size=micro_batch_size,
            sampler=ResumableShuffleSampler(len(rows), seed=seed, **shard),
            collate_fn=PackedSFTCollator(),
            num_workers=num_workers,
            batches_done=batches_done,
        )
    group = micro_batch_size * 16 if group_by_length else 0
    sampler = ResumableShuffleSampler(len(dataset), seed=seed, lengths=lengths, group_size=group, **shard)
    return ResumableDataLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=SFTCollator(pad_token_id),
        num_workers=num_workers,
        batches_done=batches_done,
    )


class PackedRows(torch.utils.data.Dataset):
    """Bins of packed examples: item i is the list of examples in bin i (a micro-batch's bins are
    flattened into one row by the collator)."""

    def __init__(self, dataset, bins: list[list[int]]):
        self.dataset = dataset
        self.bins = bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int):
        return [self.dataset[i] for i in self.bins[index]]
