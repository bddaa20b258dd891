"""Atomic writes: a reader never sees half a file.

Whole files (and folders) are written to a temporary name and moved into place with `os.replace`;
the temporaries of writers killed mid-write are removed by the next writer. JSON is written strict
(no NaN, which other readers reject).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from palign.artifacts.errors import naming_a_full_disk

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling path; on success move it onto `target` in one `os.replace`.

    Works for files and folders (a folder target is replaced whole). On error the temporary path
    is removed and `target` is untouched. A full disk (ENOSPC, EDQUOT) while writing raises
    `DiskFullError` naming `target`: the caller writes to a temporary name it never chose, so the raw
    error would name a file nobody knows.
    """
    target = Path(target)
    with naming_a_full_disk(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        # held until the temporary folder is gone: a later writer of `target` removes it only once it can
        # take this lock, that is once this process is gone (the kernel releases it however it dies)
        writing = open(tmp / f"{WRITER_LOCK}.new", "wb")  # noqa: SIM115 (the lock must outlive this block; closed in finally)
        fcntl.flock(writing.fileno(), fcntl.LOCK_EX)
        os.rename(tmp / f"{WRITER_LOCK}.new", tmp / WRITER_LOCK)  # visible to cleaners only once locked
    inner = tmp / (target.name + suffix)
    try:
        with naming_a_full_disk(target):
            yield inner
            if target.is_dir() and not target.is_symlink():
                # os.replace cannot replace a non-empty folder: move the old one aside first.
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(inner, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(inner, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        writing.close()


WRITER_LOCK = ".writing"


def remove_dead_temporaries(target: Path) -> int:
    """Remove the temporary folders that writers of `target` killed mid-write left beside it (a
    7B student's export is ~15 GB, one per kill): those whose writer lock (`atomic_path`) can be
    taken, so a live writer's folder, on this host or another sharing the disk, is kept. Returns
    how many were removed."""
    removed = 0
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        try:
            fd = os.open(tmp / WRITER_LOCK, os.O_RDWR)
        except OSError:  # no lock file: not one of ours, or its writer has not locked it yet
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its writer is alive (or this file system keeps no locks: keep it)
            continue
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
            log.info("%s: removed %s, left by a writer that is no longer running", target, tmp.name)
        finally:
            os.close(fd)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite_json(obj: Any, path: str | os.PathLike, where: str = "") -> Any:
    """`obj` with every NaN or infinity replaced by None (JSON null), each named in a warning.

    JSON has no NaN: Python would write the non-standard token `NaN`, which other readers (jq,
    JavaScript, W&B's importers) reject, and a NaN metric would pass for a number in a table.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        log.warning("%s: %s is %s; written as null (JSON has no NaN or infinity)", path, where or "a value", obj)
        return None
    if isinstance(obj, Mapping):
        return {k: finite_json(v, path, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, path, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def to_json(obj: Any, path: str | os.PathLike, **kw: Any) -> str:
    return json.dumps(finite_json(obj, path), ensure_ascii=False, default=str, allow_nan=False, **kw)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, to_json(obj, path, indent=2) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(to_json(record, path) + "\n")
            count += 1
    return count
