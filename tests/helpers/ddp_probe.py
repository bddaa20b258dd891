"""A Lightning callback that records which training rows each rank sees, for the DDP tests.

Every training micro-batch appends one line to `<folder>/rank<r>.jsonl`: the epoch, the optimizer
step, and a digest of each row's real tokens. At the start of training, rank 0 also writes the
digests of the whole training set (`<folder>/dataset.json`), so a test can check that each epoch's
shards are disjoint and together the whole set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytorch_lightning as pl


def row_digest(ids) -> str:
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:16]


class RecordBatches(pl.Callback):
    changes_results = False  # an observer: it does not name the run (palign/runs.py)

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module):
        self.folder.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            dataset = trainer.datamodule._datasets["train"]
            (self.folder / "dataset.json").write_text(json.dumps([row_digest(ids) for ids in dataset["input_ids"]]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = [row_digest(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        line = {"epoch": trainer.current_epoch, "step": trainer.global_step, "rows": rows, "world": trainer.world_size}
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
