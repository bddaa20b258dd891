"""Crash-safe Lightning checkpoints: written to a temporary file and moved into place, and only at
points Lightning resumes from exactly.

Lightning's own writer streams into the final path, so a kill mid-write (the case resuming exists
for) can leave a torn `last.ckpt` that the rerun cannot load. Writing a sibling temporary file and
`os.replace`-ing it keeps the previous checkpoint intact until the new one is complete.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if "://" in path:  # remote filesystems: fall back to Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class ResumableCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimizer steps within an epoch and at every epoch's
    end, and never from an epoch's last batch.

    Lightning (2.6) resumes a checkpoint written at the last batch's `on_train_batch_end` as if that
    epoch had ended, but then never counts the next epoch as started: a later mid-epoch checkpoint
    of that next epoch is then not seen as mid-epoch, its loader state is dropped, and the resumed
    epoch restarts from its first batch (trained twice). The epoch-end checkpoint (after validation)
    is the path Lightning resumes correctly; a crash between the two resumes from the step before.
    Builds on ModelCheckpoint's own `_save_last_checkpoint` (private API, checked by the resume tests).
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ReleaseVLLMEngines(Callback):
    """Free the GPU memory of the vLLM engines stages 1 and 2 used before training takes it (a class,
    not a lambda: `ddp_spawn` pickles the callbacks into its processes)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        from palign.llm.vllm_backend import release_vllm_engines

        release_vllm_engines()
