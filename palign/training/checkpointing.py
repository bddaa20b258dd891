"""Crash-safe Lightning checkpoints: written to a temporary file and moved into place.

Lightning's own writer streams into the final path, so a kill mid-write (the case resuming exists
for) can leave a torn `last.ckpt` that the rerun cannot load. Writing a sibling temporary file and
`os.replace`-ing it keeps the previous checkpoint intact until the new one is complete.
"""

from __future__ import annotations

import os
from typing import Any

import torch
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
