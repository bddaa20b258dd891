"""A Lightning callback that records which validation rows each rank sees, for the DDP tests.

Every validation micro-batch appends one line to `<folder>/val_rank<r>.jsonl`: the epoch, a digest of
each row's real tokens, and the batch's supervised tokens (0 for the batches that even out the
ranks' shards). At the start of training rank 0 writes the digests of the whole validation split
(`<folder>/val_dataset.json`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl

from ddp_probe import row_digest


class RecordValidation(pl.Callback):
    changes_results = False  # an observer: it does not name the run (palign/runs.py)

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module):
        self.folder.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            dataset = trainer.datamodule._datasets["val"]
            (self.folder / "val_dataset.json").write_text(json.dumps([row_digest(ids) for ids in dataset["input_ids"]]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        rows = [row_digest(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        line = {"epoch": trainer.current_epoch, "rows": rows, "supervised": int((batch["labels"][:, 1:] != -100).sum())}
        with open(self.folder / f"val_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
