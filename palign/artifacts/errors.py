"""The errors every artifact reader and writer raises: they are part of the interface.

A bad input raises `DataFormatError` naming the file, the line and the field, and saying how to fix it;
a write that finds the disk full raises `DiskFullError` naming the file the user knows (not a temporary
one) and what a rerun keeps, whichever library (Python, torch, safetensors, Arrow) met the full disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path


class DataFormatError(ValueError):
    """Bad input data: the message names the file, the line and the field and says how to fix it."""


class DiskFullError(OSError):
    """A write failed because the disk or the user's quota is full; names the file being written.

    An `OSError` (with the original `errno`, and the original error as `__cause__`), so code that
    already handles write failures keeps handling this one.
    """


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def disk_full_errno(err: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `err`, or an error it was raised from, is a write that found the disk full.

    Python's own writes raise `OSError` with the errno; writers in other languages report it in their
    own words: `torch.save` raises `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`
    from the `OSError`, safetensors (the student's export) a `SafetensorError` whose text ends with
    `No space left on device (os error 28)`, Arrow an `OSError` without an errno.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return err.errno
        text = str(err)
        for number in _DISK_FULL:
            if os.strerror(number) in text:
                return number
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def naming_a_full_disk(path: str | os.PathLike, kept: str = "finished work is kept") -> Iterator[None]:
    """Turn a full disk met inside (see `disk_full_errno`) into a `DiskFullError` naming `path` and
    saying what is `kept`; any other error passes unchanged."""
    try:
        yield
    except Exception as err:
        number = None if isinstance(err, DiskFullError) else disk_full_errno(err)
        if number is None:
            raise
        full = DiskFullError(
            f"{path}: disk full ({_DISK_FULL[number]}) while writing it; free space on the disk holding "
            f"{Path(path).parent} (or point paths.root / paths.cache_dir at a larger disk) and rerun the same "
            f"command: {kept}"
        )
        full.errno = number
        raise full from err
