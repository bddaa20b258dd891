"""Resumable record stores of the cached stages, and the locks and ranks of processes sharing them.

Each cached stage (truncation, alignment, teacher generation, evaluation, chain judge) keeps its
records in a folder named by a fingerprint of its inputs. A crash mid-stage must resume without
redoing or duplicating finished work: completed records are appended one JSON line at a time
(flushed and fsynced), and a torn last line from a crash is dropped on reopening. Processes sharing
a cache (DDP ranks, SLURM tasks on several nodes) take a file lock per store, so each record is
computed once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from palign.artifacts.digests import fingerprint
from palign.artifacts.errors import DataFormatError, naming_a_full_disk
from palign.artifacts.readers import json_error_text
from palign.artifacts.writes import to_json, write_json_atomic

log = logging.getLogger(__name__)


# How long a process waits for another one computing the same cached stage (`paths.lock_timeout_s`,
# set by the run). DDP ranks and SLURM tasks sharing a cache meet here: one computes, the others
# wait and then read its records, so nothing is computed twice.
LOCK_TIMEOUT_S: float = 86_400.0


def set_lock_timeout(seconds: float) -> None:
    global LOCK_TIMEOUT_S
    LOCK_TIMEOUT_S = float(seconds)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold `<path>.lock` (an OS file lock, released when the process dies, so a crash leaves no stale
    lock) while computing what `path` caches. Re-entrant within one process. Waits at most
    `LOCK_TIMEOUT_S` for another process, then fails naming the lock."""
    from filelock import FileLock, Timeout

    lock_path = f"{os.fspath(path)}.lock"
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another process is computing it; waiting for it (at most %.0f s)", path, LOCK_TIMEOUT_S)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise TimeoutError(
                f"{lock_path}: another process has held this lock for more than {LOCK_TIMEOUT_S:.0f} s "
                "(paths.lock_timeout_s); it is still computing this cached stage: wait for it, run the stage "
                "as its own job first (stage=align), or raise paths.lock_timeout_s"
            ) from None
    try:
        yield
    finally:
        lock.release()


def stage_folder(root: str | os.PathLike, identity: Any, label: str = "") -> Path:
    """Where a cached stage keeps what `identity` (everything that decides its records) computes:
    `<root>/<label-><fingerprint>`; two runs with the same identity share it, any change is a new one."""
    key = fingerprint(identity)
    return Path(root) / (f"{label}-{key}" if label else key)


def open_stage_store(
    folder: str | os.PathLike, identity: Any, key: str = "id", name: str = "records.jsonl"
) -> RecordStore:
    """The resumable record store of one cached stage (truncation, alignment, teacher generation,
    evaluation, chain judge): `<folder>/settings.json` says once what computed it, `<folder>/<name>`
    holds the finished records, so an interrupted stage reopens it and completes only what is missing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = exclusive(folder / name)
    lock.__enter__()  # released by the store's close(): one writer per store across processes and nodes
    try:
        if not (folder / "settings.json").exists():
            write_json_atomic(folder / "settings.json", identity)
        # read under the lock: what another writer finished counts
        return RecordStore(folder / name, key=key, lock=lock)
    except BaseException:
        lock.__exit__(None, None, None)
        raise


class RecordStore:
    """An append-only JSONL store of finished records keyed by a string id, for resumable stages.

    `done` holds the ids already written; `add` appends and fsyncs one record, so an interrupted
    stage reopens the store and skips what it finished. A torn last line (a crash mid-write) is cut
    off on opening. `seal()` marks the stage complete so later runs can trust the store as-is.
    """

    def __init__(self, path: str | os.PathLike, key: str = "id", lock: contextlib.AbstractContextManager | None = None):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = lock  # an entered lock (open_stage_store's), released by close()
        if self.path.exists():
            self._load()
        self._file = None

    @property
    def complete_marker(self) -> Path:
        return self.path.with_name(self.path.name + ".complete")

    @property
    def complete(self) -> bool:
        return self.complete_marker.exists()

    def _load(self) -> None:
        good_bytes = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break  # a torn line: only the last write before a crash lacks its newline
                # A complete line was written whole by `add`; if it does not read back, the file was
                # damaged afterwards, and truncating here would silently drop every later record.
                damaged = f"{self.path}:{lineno}: damaged record store"
                fix = f"delete {self.path} (and its .complete marker) to recompute this stage"
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise DataFormatError(f"{damaged}: invalid UTF-8 at column {err.start + 1}; {fix}") from err
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{damaged}: malformed JSON ({json_error_text(err)}); {fix}") from err
                if not isinstance(obj, dict) or obj.get(self.key) is None:
                    raise DataFormatError(f"{damaged}: line has no value for field '{self.key}'; {fix}")
                self._records[str(obj[self.key])] = obj
                good_bytes += len(raw)
        if good_bytes < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)

    def __contains__(self, key: object) -> bool:
        return str(key) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(str(key))

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def add(self, record: Mapping[str, Any]) -> None:
        key = str(record[self.key])
        if key in self._records:
            return
        line = to_json(record, self.path) + "\n"
        size = None
        with naming_a_full_disk(self.path):
            try:
                if self._file is None:
                    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open across `add`s; closed by `seal`)
                size = os.fstat(self._file.fileno()).st_size
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError:
                # Drop what this write left behind (a torn line, a half-full buffer), so that a later
                # `add`, or reopening the store, starts from the last complete record.
                file, self._file = self._file, None
                if file is not None:
                    with contextlib.suppress(OSError):
                        file.close()
                if size is not None:
                    with contextlib.suppress(OSError):
                        os.truncate(self.path, size)
                raise
        self._records[key] = dict(record)

    def seal(self, summary: Mapping[str, Any] | None = None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        write_json_atomic(self.complete_marker, dict(summary or {}, records=len(self)))
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# the variables launchers set for a process of a distributed job: torchrun and Lightning's own
# launcher (RANK, LOCAL_RANK, NODE_RANK), SLURM (SLURM_PROCID)
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


def is_global_zero() -> bool:
    """Whether this process is global rank 0 of its job (a plain run is). Read from the launcher's
    environment, so it is known before any Trainer exists: every rank runs the training, only rank
    0 writes the run's summary, exports, evaluates, reports and records a multirun's jobs."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)
