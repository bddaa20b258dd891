"""Crash-safe Lightning checkpoints: written to a temporary file and moved into place, and only at
points Lightning resumes from exactly.

Lightning's own writer streams into the final path, so a kill mid-write (the case resuming exists
for) can leave a torn `last.ckpt` that the rerun cannot load. Writing a sibling temporary file and
`os.replace`-ing it keeps the previous checkpoint intact until the new one is complete; a full disk
is reported naming `last.ckpt` (torch's own error is an `unexpected pos` from its zip writer).

A writer killed mid-write leaves its temporary file behind (several GB for a 7B student, one per
kill), so every run removes, when it starts or resumes, the temporary files whose writer is gone.
"Gone" is asked of the writer, not read from the name: a writer holds an exclusive `flock` on its
temporary file from creating it until it is renamed, the kernel releases it when the writer dies
(however it dies), and the cleaner removes only a file whose lock it can take. Another run writing
into the same folder right now (a second node, a rerun started too early) keeps its file. The name
(`last.ckpt.tmp-<host>-<pid>`) only decides, where a file system has no locks, whether this host
can tell: a file of this host whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from palign.artifacts.errors import naming_a_full_disk

log = logging.getLogger(__name__)

# `<checkpoint>.tmp-<host>-<pid>`; `<checkpoint>.tmp-<pid>` is how writers named it before they locked it
TEMPORARY = re.compile(r"(?P<target>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)")
# errors that say a file system keeps no locks (then the name decides, on this host only)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "localhost"


def temporary_path(path: str) -> str:
    """Where this process writes `path` before moving it into place."""
    return f"{path}.tmp-{_host()}-{os.getpid()}"


@contextlib.contextmanager
def _locked_new_file(tmp: str) -> Iterator[IO[bytes]]:
    """`tmp` created and held under an exclusive lock until the block ends (see the module docstring).

    A cleaner may take the lock of a file just created and remove it before its writer locks it;
    the writer then holds the lock of a file no longer in the folder, notices, and starts over.
    """
    for _ in range(100):
        f = open(tmp, "wb")  # noqa: SIM115 (returned locked to the caller, or closed on each failure)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                f.close()
                raise
            break  # no locks here: cleaners go by the name (this host's live pid is kept)
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(tmp)):
                break
        except FileNotFoundError:
            pass
        f.close()
    else:
        raise RuntimeError(f"{tmp}: removed 100 times while being created; is another process deleting it?")
    try:
        yield f
    finally:
        f.close()  # releases the lock


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if "://" in path:  # remote filesystems: fall back to Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        tmp = temporary_path(path)
        with naming_a_full_disk(
            path, kept=f"the previous {os.path.basename(path)} is kept, and the run resumes from it"
        ):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                with _locked_new_file(tmp) as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                    os.replace(tmp, path)  # still locked: a cleaner never sees a finished file as abandoned
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_if_writer_gone(tmp: Path) -> int | None:
    """Remove `tmp` if the process that wrote it is gone; its size in bytes, or None if kept."""
    match = TEMPORARY.fullmatch(tmp.name)
    if match is None:
        return None
    host, pid = match["host"], int(match["pid"])
    if pid == os.getpid() and host in (None, _host()):
        return None  # this process's own
    try:
        fd = os.open(tmp, os.O_RDWR)  # (for writing: NFS grants an exclusive lock only then)
    except OSError:  # gone meanwhile, a folder, not ours to open
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # its writer is alive and writing
        except OSError as err:
            if err.errno not in _NO_LOCKS or host != _host() or _pid_alive(pid):
                return None  # no locks here, and this host cannot tell: keep it
        stat = os.fstat(fd)
        try:
            if not os.path.samestat(stat, os.stat(tmp)):
                return None  # replaced meanwhile by a new file (of a live writer)
        except FileNotFoundError:
            return None
        os.remove(tmp)  # under the lock: a writer that created it but had not locked it yet starts over
        return stat.st_size
    finally:
        os.close(fd)


def remove_abandoned_temporary_files(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """Remove the temporary checkpoint files in `folder` whose writer is gone (killed mid-write);
    returns each with its size. A file a live process is writing is kept, on any host."""
    removed = []
    for tmp in sorted(Path(folder).glob("*.tmp-*")):
        size = _remove_if_writer_gone(tmp)
        if size is not None:
            removed.append((tmp, size))
    if removed:
        log.info(
            "removed %d temporary checkpoint %s no longer running: %s",
            len(removed),
            "file whose writer is" if len(removed) == 1 else "files whose writers are",
            ", ".join(f"{tmp.name} ({size / 2**20:.1f} MiB)" for tmp, size in removed),
        )
    return removed


class ResumableCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimizer steps within an epoch and at every epoch's
    end, and never from an epoch's last batch.

    Lightning (2.6) resumes a checkpoint written at the last batch's `on_train_batch_end` as if that
    epoch had ended, but then never counts the next epoch as started: a later mid-epoch checkpoint
    of that next epoch is then not seen as mid-epoch, its loader state is dropped, and the resumed
    epoch restarts from its first batch (trained twice). The epoch-end checkpoint (after validation)
    is the path Lightning resumes correctly; a crash between the two resumes from the step before.
    Builds on ModelCheckpoint's own `_save_last_checkpoint` (private API, checked by the resume tests).
    When a run starts or resumes, the temporary files of writers killed mid-write are removed.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath) and os.path.isdir(self.dirpath):
            remove_abandoned_temporary_files(self.dirpath)

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
