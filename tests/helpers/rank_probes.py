"""Lightning callbacks that record what each rank of a job sees, for the DDP and FSDP tests.

`RecordValidation`: every validation micro-batch appends one line to `<folder>/val_rank<r>.jsonl`:
the epoch, a digest of each row's real tokens, and the batch's supervised tokens (0 for the batches
that even out the ranks' shards). At the start of training rank 0 writes the digests of the whole
validation split (`<folder>/val_dataset.json`).

`RecordFSDPUnits`: at the start of training each rank writes `<folder>/fsdp_rank<r>.json`: its FSDP
units, the student's decoder layers, the dtypes of the units' flat parameters and whether any needs
a gradient, and the parameters FSDP leaves outside its units (their names and dtypes).

`RecordStepGradients`: for the first optimizer step each rank saves `<folder>/grads_rank<r>.pt`: the
trainable parameters' gradients as its own backward left them (after the step's last micro-batch,
accumulated) and as the optimizer step sees them (after the strategy's averaging, before clipping),
and how many backward passes the step took.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch

from tests.helpers.ddp_probe import row_digest


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


class RecordFSDPUnits(pl.Callback):
    changes_results = False

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.fsdp import FullyShardedDataParallel

        from palign.training.fsdp import decoder_layer_classes

        self.folder.mkdir(parents=True, exist_ok=True)
        units = FullyShardedDataParallel.fsdp_modules(trainer.strategy.model)
        layers = [m for m in pl_module.modules() if isinstance(m, decoder_layer_classes(pl_module))]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        outside = units[0]._ignored_params
        record = {
            "units": len(units),
            "decoder_layers": len(layers),
            "flat_dtypes": sorted({str(u._flat_param.dtype) for u in units if u._flat_param is not None}),
            "flat_requires_grad": any(u._flat_param.requires_grad for u in units if u._flat_param is not None),
            "outside_units": sorted(names[id(p)] for p in outside),
            "outside_dtypes": sorted({str(p.dtype) for p in outside}),
            "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
        }
        (self.folder / f"fsdp_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RecordStepGradients(pl.Callback):
    changes_results = False

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.local: dict[str, torch.Tensor] = {}
        self.backward_passes = 0
        self.done = False

    def _gradients(self, pl_module) -> dict[str, torch.Tensor]:
        return {
            n: p.grad.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.requires_grad and p.grad is not None
        }

    def on_after_backward(self, trainer, pl_module):
        if not self.done:  # the last one before the step holds the step's accumulated local gradient
            self.local = self._gradients(pl_module)
            self.backward_passes += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.done:
            return
        self.done = True
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"local": self.local, "stepped": self._gradients(pl_module), "backward_passes": self.backward_passes},
            self.folder / f"grads_rank{trainer.global_rank}.pt",
        )
