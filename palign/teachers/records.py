"""The teacher record: the one schema every teacher source yields and every later stage reads
(truncation, alignment, supervision targets), so none of them cares where a trace came from."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from palign.artifacts.digests import fingerprint


@dataclass
class TeacherRecord:
    id: str
    question: str
    answer: str | None
    long_cot: str
    short_cot: str | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TeacherData:
    records: list[TeacherRecord]
    skipped: Counter = field(default_factory=Counter)

    def fingerprint(self) -> str:
        return fingerprint([r.to_dict() for r in self.records])
