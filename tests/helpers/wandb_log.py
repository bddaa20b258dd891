"""Read what an offline W&B run wrote: its transaction log (`run-<id>.wandb`) record by record, with
W&B's own protobuf classes (`wandb.proto.wandb_internal_pb2.Record`), and the files beside it.

wandb 0.31 keeps no Python reader of its log (the core writes it in Go), so the framing is read
here: a 7-byte header (`:W&B`, version), then a LevelDB-style log of 32 KiB blocks of chunks, each
with a 7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last);
every whole record is a serialized `Record`. tests/test_pipeline.py reads history keys the same way.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def records(path: Path) -> Iterator[Any]:
    """Every `wandb_internal_pb2.Record` of a transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = payload
        elif kind in (3, 4):
            pending += payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """An offline run as W&B stored it: config, summary (the last value of each key), history keys,
    the metrics declared with define_metric, and the folder holding its media files."""

    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history_keys: set[str] = field(default_factory=set)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def table(self, key: str) -> dict[str, Any]:
        """A logged `wandb.Table` as W&B wrote it to the run's files (`{"columns": ..., "data": ...}`)."""
        entry = self.summary[key]
        return json.loads((self.folder / "files" / entry["path"]).read_text(encoding="utf-8"))


def read_offline_run(folder: Path) -> OfflineRun:
    """The offline run in `folder` (`.../wandb/offline-run-<time>-<id>/`)."""
    (log,) = Path(folder).glob("run-*.wandb")
    run = OfflineRun(Path(folder))
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            for item in updates:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                key, value = _key(item), json.loads(item.value_json)
                if item.nested_key and len(item.nested_key) > 1:  # a table's fields, one by one
                    run.summary.setdefault(item.nested_key[0], {})[item.nested_key[-1]] = value
                else:
                    run.summary[key] = value
        elif kind == "history":
            run.history_keys.update(_key(item) for item in record.history.item)
        elif kind == "metric":
            metric = record.metric
            run.metrics[metric.name or metric.glob_name] = {
                "summary": [
                    name
                    for name in ("min", "max", "mean", "last", "first", "best", "copy", "none")
                    if getattr(metric.summary, name, False)
                ]
            }
    return run
