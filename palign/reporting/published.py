"""Published results beside the runs: the rows of `published.yaml` (the paper's own Table 1 row for
Qwen2.5-7B-Instruct, PAPER.md §7.1; users add theirs) and, per cell of a matching run, whether the
published value lies inside the run's interval.

A published value is printed to two decimals (26.67 for 8/30), so it counts as inside when it lies
within half a unit of its last printed digit of the interval: 26.67 is inside [13.33..., 26.666...].
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from palign.artifacts.errors import DataFormatError

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")
"""palign's own file of published results (`report.published_file: null`)."""

REPRODUCED, BELOW, ABOVE = "reproduced", "below", "above"
_PRINTED_HALF_UNIT = 0.005
"""Half a unit of the published values' last printed digit (two decimals)."""


@dataclass(frozen=True)
class PublishedRow:
    """One published row: values in percent by metric (`pass@1`, `pass@<k>`) and benchmark (`avg` too)."""

    name: str
    source: str
    student: str
    method: str
    values: Mapping[str, Mapping[str, float]]

    def value(self, metric: str, benchmark: str) -> float | None:
        return self.values.get(metric, {}).get(benchmark)

    @property
    def benchmarks(self) -> set[str]:
        return {b for per_benchmark in self.values.values() for b in per_benchmark if b != "avg"}


def load_published(path: str | os.PathLike | None = None) -> dict[str, PublishedRow]:
    """Every row of a published-results file (None: palign's own), checked: a malformed row raises
    DataFormatError naming the file, the row and the field."""
    path = Path(path) if path is not None else PUBLISHED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no published-results file (report.published_file; null: palign's own)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataFormatError(f"{path}: malformed YAML ({err})") from err
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a mapping of row name -> row, got {type(data).__name__}")
    rows = {}
    for name, row in data.items():
        where = f"{path}: row '{name}'"
        if not isinstance(row, dict):
            raise DataFormatError(f"{where}: expected a mapping with source, student, method and metrics")
        for field in ("source", "student", "method"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise DataFormatError(f"{where}: field '{field}' must be a non-empty string")
        values = {}
        for metric, per_benchmark in row.items():
            if metric in ("source", "student", "method"):
                continue
            if not metric.startswith("pass@") or not isinstance(per_benchmark, dict):
                raise DataFormatError(
                    f"{where}: field '{metric}': expected pass@1 or pass@<k>, each a mapping of benchmark -> percent"
                )
            for benchmark, value in per_benchmark.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                    raise DataFormatError(
                        f"{where}: field '{metric}.{benchmark}': expected a percentage in [0, 100], got {value!r}"
                    )
            values[metric] = {str(b): float(v) for b, v in per_benchmark.items()}
        if not values:
            raise DataFormatError(f"{where}: no values (pass@1, pass@<k>)")
        rows[str(name)] = PublishedRow(
            str(name), " ".join(row["source"].split()), row["student"], row["method"], values
        )
    return rows


def select_published(names: list[str], path: str | os.PathLike | None = None) -> list[PublishedRow]:
    """The rows `report.published` names, in its order; an unknown name is an error listing the file's rows."""
    if not names:
        return []
    rows = load_published(path)
    unknown = [name for name in names if name not in rows]
    if unknown:
        raise ValueError(
            f"report.published names {unknown}, which {path or PUBLISHED_FILE} does not hold; its rows: {sorted(rows)}"
        )
    return [rows[name] for name in names]


def verdict(published: float, low: float, high: float) -> str:
    """reproduced: the published value lies inside the run's interval [low, high] (to its printed
    precision); below: under it (the run did better); above: over it (the run did worse)."""
    if published < low - _PRINTED_HALF_UNIT:
        return BELOW
    if published > high + _PRINTED_HALF_UNIT:
        return ABOVE
    return REPRODUCED
