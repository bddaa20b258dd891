"""Artifacts every stage writes: atomic files, strict JSONL, resumable record stores, fingerprints.

Each stage of the method (truncation, alignment, tokenisation, evaluation) writes what it computed
under a folder named by a fingerprint of its inputs. A crash mid-stage must resume without redoing
or duplicating finished work, and a reader must never see half a file: completed records are
appended one JSON line at a time (flushed and fsynced), a torn last line from a crash is dropped on
reopening, and whole files are written to a temporary name and moved into place with `os.replace`.
Processes sharing a cache (DDP ranks, SLURM tasks on several nodes) take a file lock per store, so
each record is computed once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A stable hex digest of JSON-serialisable parts (dict key order does not matter)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling path; on success move it onto `target` in one `os.replace`.

    Works for files and folders (a folder target is replaced whole). On error the temporary path
    is removed and `target` is untouched. A full disk (ENOSPC, EDQUOT) while writing raises `DiskFullError` naming `target`: the caller
    writes to a temporary name it never chose, so the raw error would name a file nobody knows.
    """
    target = Path(target)
    with naming_a_full_disk(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        # held until the temporary folder is gone: a later writer of `target` removes it only once it can
        # take this lock, that is once this process is gone (the kernel releases it however it dies)
        writing = open(tmp / f"{WRITER_LOCK}.new", "wb")
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


def _invalid_utf8(path: Path, data: bytes, err: UnicodeDecodeError, first_lineno: int = 1) -> DataFormatError:
    """The error for undecodable `data` (a line, or a whole file starting at `first_lineno`)."""
    lineno = first_lineno + data.count(b"\n", 0, err.start)
    column = err.start - data.rfind(b"\n", 0, err.start)  # 1-based, in bytes
    return DataFormatError(
        f"{path}:{lineno}: invalid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
        "JSON files must be UTF-8: re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
    )


def json_error_text(err: json.JSONDecodeError) -> str:
    """What is wrong and where on its line: `Expecting value at column 7`. Some of Python's messages
    end in "at" themselves (`Unterminated string starting at`, `Invalid control character at`): it is
    said once."""
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def read_json(path: str | os.PathLike) -> Any:
    """One JSON document; malformed JSON or invalid UTF-8 raises naming file and line."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _invalid_utf8(path, raw, err) from err
    if not text.strip():
        raise DataFormatError(f"{path}: the file is empty (0 bytes or only blank lines); expected one JSON document")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}:{err.lineno}: malformed JSON ({json_error_text(err)})"
        ) from err


DIGESTS_FILE = ".palign-digests.json"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of one file's bytes, read in 16 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


def file_digests(folder: str | os.PathLike, pattern: str = "*.safetensors") -> dict[str, str]:
    """SHA-256 of each file matching `pattern` in `folder`: what the files hold, not when they were written.

    Digests are kept in `<folder>/.palign-digests.json` under each file's size and mtime, so a file
    is read once per version (a 7B student is ~15 GB: ~15 s to hash); a folder that cannot be
    written to is simply hashed each time.
    """
    folder = Path(folder)
    sidecar = folder / DIGESTS_FILE
    try:
        known = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    digests, updated = {}, {}
    for path in sorted(p for p in folder.glob(pattern) if p.is_file() and p.name != DIGESTS_FILE):
        stat = path.stat()
        version = [stat.st_size, stat.st_mtime_ns]
        entry = known.get(path.name)
        if not (isinstance(entry, dict) and entry.get("version") == version):
            entry = {"version": version, "sha256": file_sha256(path)}
        updated[path.name] = entry
        digests[path.name] = entry["sha256"]
    if updated != known:
        with contextlib.suppress(OSError):
            write_json_atomic(sidecar, updated)
    return digests


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line number, object)` for a JSONL file; a malformed line raises naming file and line.

    Blank lines are skipped. Lines are decoded one at a time, so invalid UTF-8 is reported with its
    line rather than as a bare `UnicodeDecodeError` from deep inside the file object.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _invalid_utf8(path, raw, err, first_lineno=lineno) from err
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{path}:{lineno}: malformed JSON line ({json_error_text(err)}); "
                    "each line must be one complete JSON object"
                ) from err
            if not isinstance(obj, dict):
                raise DataFormatError(
                    f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"
                )
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    for _, obj in iter_jsonl(path):
        yield obj


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(where, record)` from a `.jsonl` file or a `.json` list of objects.

    `where` ("file:line", or "file: record i" for a JSON list) is what error messages cite.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        for index, record in enumerate(data):
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
            yield f"{path}: record {index}", record
        return
    for lineno, record in iter_jsonl(path):
        yield f"{path}:{lineno}", record


def json_kind(value: Any) -> str:
    """How a value reads in the file: `null`, `a boolean (true)`, `a number (3.5)`, `a list ([...])`."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if value is None:
        return "null"
    kind = ("a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float))
            else "a list" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, dict)
            else f"a {type(value).__name__}")
    return f"{kind} ({shown})"


def record_id(value: Any, field: str, where: str, fix: str) -> str:
    """A record id as text: a non-empty string, or an integer (one spelling only: 7 -> "7").

    Ids key every cached stage and result file; null, floats, booleans and lists would become
    "None", "3.0", "True" or a repr, so they are refused naming `where` and `field`, with `fix`.
    """
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    shown = "an empty string" if isinstance(value, str) else json_kind(value)
    raise DataFormatError(f"{where}: field '{field}' must be a non-empty string or an integer (the record id), got {shown}; {fix}")


def require_field(record: Mapping[str, Any], field: str, where: str) -> Any:
    """`record[field]` (dotted paths and list indices like `code.0` allowed) or a clear error."""
    value: Any = record
    for part in field.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            keys = ", ".join(sorted(record)) if isinstance(record, Mapping) else type(record).__name__
            raise DataFormatError(
                f"{where}: missing field '{field}' (available: {keys}); "
                "set the field name in the teacher/benchmark config"
            )
    return value


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
                "as its own job first (stage=align), or raise paths.lock_timeout_s") from None
    try:
        yield
    finally:
        lock.release()


def stage_folder(root: str | os.PathLike, identity: Any, label: str = "") -> Path:
    """Where a cached stage keeps what `identity` (everything that decides its records) computes:
    `<root>/<label-><fingerprint>`; two runs with the same identity share it, any change is a new one."""
    key = fingerprint(identity)
    return Path(root) / (f"{label}-{key}" if label else key)


def open_stage_store(folder: str | os.PathLike, identity: Any, key: str = "id", name: str = "records.jsonl") -> RecordStore:
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
                    self._file = open(self.path, "a", encoding="utf-8")
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
