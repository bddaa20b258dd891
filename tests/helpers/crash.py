"""A Lightning callback that crashes its own process with SIGKILL at a chosen point of training.

The exact-resume tests add it to `python run.py` (`+callbacks.crash._target_=tests.helpers.crash.KillAt`) to
crash a real run at a point they choose — mid gradient accumulation, while a checkpoint is being
built, at an epoch's end — instead of racing a running process with a wall-clock timer.
"""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAt(pl.Callback):
    """SIGKILL (no cleanup, no final save) when `hook` runs at optimizer step `step`, at the
    `micro`-th micro-batch of the accumulation window if given (batch hooks only); with `whole_job`,
    the process group (every rank of a DDP job: run it in a session of its own)."""

    changes_results = False  # a crash says nothing about what is trained: it does not name the run (palign/runs.py)

    def __init__(self, hook: str, step: int, micro: int | None = None, whole_job: bool = False):
        self.hook, self.step, self.micro, self.whole_job = hook, step, micro, whole_job

    def _maybe_kill(self, trainer: pl.Trainer, hook: str, batch_idx: int | None = None) -> None:
        if hook != self.hook or trainer.global_step != self.step:
            return
        if (
            self.micro is not None
            and batch_idx is not None
            and batch_idx % trainer.accumulate_grad_batches != self.micro
        ):
            return
        if self.whole_job:  # every process of the job at once, as `kill -9` of a DDP job or scancel does
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe_kill(trainer, "on_train_batch_start", batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe_kill(trainer, "on_train_batch_end", batch_idx)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._maybe_kill(trainer, "on_save_checkpoint")

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe_kill(trainer, "on_train_epoch_end")
