"""Fingerprints of what decides an artifact, and digests of what a file holds.

Each stage of the method (truncation, alignment, tokenisation, evaluation) writes what it computed
under a folder named by a fingerprint of its inputs; trained weights are identified by the SHA-256
of their bytes, not by when they were written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from palign.artifacts.writes import write_json_atomic


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A stable hex digest of JSON-serialisable parts (dict key order does not matter)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


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
