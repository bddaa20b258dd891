"""Grading sampled predictions and laying results out as the paper's Table 1 (§3, §7.1, §7.4).

A prediction file is JSONL in the authors' format: one line per problem with the gold `answer`
and `output`, the list of n sampled completions (n = 3 in the paper); `id`, `problem` or
`prompt_ori` are optional. `grade_prediction_file` grades every sample with a `GradingPool` and
summarises with `summarize_correctness`; `results_table` renders several runs as Table 1.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from palign.artifacts.errors import DataFormatError
from palign.artifacts.readers import iter_records, record_id, require_field
from palign.evaluation.metrics import summarize_correctness
from palign.grading import GradingPool, answer_to_text, check_gold_answer

PAPER_BENCHMARKS: tuple[str, ...] = ("aime25", "aime24", "amc12", "math500")
"""Table 1's column order."""

_DISPLAY_NAMES = {"aime25": "AIME25", "aime24": "AIME24", "amc12": "AMC12", "math500": "MATH500"}
MISSING = "–"
"""A missing cell in Markdown (CSV leaves it empty)."""
_CENT = Decimal("0.01")


def grade_prediction_file(path: str | os.PathLike, pool: GradingPool) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Grade every sample of a prediction file.

    Returns `(rows, summary)`: one row per problem with `id`, `problem` (or None), `answer`
    (normalised gold) and per-sample lists `output`, `correct`, `extracted`, `timed_out`, `error`; and
    `summarize_correctness` of the correctness matrix plus `num_timeouts` and `num_errors`.

    Every problem of the file is graded, none is skipped: a gold answer nothing can be graded
    against (empty, a placeholder such as `N/A`, words, or truncated like `\\frac{11}{`:
    `palign.grading.gold_answer_problem`) is an error before any grading, as it is in
    `load_benchmark`, because it would grade all of its samples wrong without any error counted.

    Raises:
        DataFormatError: a malformed line, a missing `answer`/`output`, a gold answer nothing can
            be graded against, a non-string sample, a null/list id, or a line with a different number
            of samples than the first, naming file, line and field.
    """
    problems: list[dict[str, Any]] = []
    num_samples: int | None = None
    first_where = ""
    for index, (where, record) in enumerate(iter_records(path)):
        try:
            answer = answer_to_text(require_field(record, "answer", where))
        except TypeError as err:
            raise DataFormatError(f"{where}: field 'answer': {err}") from err
        check_gold_answer(answer, where, "answer")
        outputs = require_field(record, "output", where)
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise DataFormatError(
                f"{where}: field 'output' must be a non-empty list of strings (the sampled completions)"
            )
        if num_samples is None:
            num_samples, first_where = len(outputs), where
        elif len(outputs) != num_samples:
            raise DataFormatError(
                f"{where}: field 'output' has {len(outputs)} samples but {first_where} has "
                f"{num_samples}; "
                "pass@k needs the same number of samples for every problem"
            )
        problem_id = (
            record_id(record["id"], "id", where, "fix it, or drop the field to number problems by line")
            if "id" in record
            else str(index)
        )
        problems.append(
            {
                "id": problem_id,
                "problem": record.get("problem", record.get("prompt_ori")),
                "answer": answer,
                "outputs": outputs,
            }
        )
    if not problems:
        raise DataFormatError(f"{path}: no predictions in file")

    pairs = [(output, problem["answer"]) for problem in problems for output in problem["outputs"]]
    grades = iter(pool.grade(pairs, desc=f"grading {os.fspath(path)}"))
    rows = []
    for problem in problems:
        sample_grades = [next(grades) for _ in problem["outputs"]]
        rows.append(
            {
                "id": problem["id"],
                "problem": problem["problem"],
                "answer": problem["answer"],
                "output": problem["outputs"],
                "correct": [g.correct for g in sample_grades],
                "extracted": [g.extracted for g in sample_grades],
                "timed_out": [g.timed_out for g in sample_grades],
                "error": [g.error for g in sample_grades],
            }
        )
    summary = summarize_correctness([row["correct"] for row in rows])
    summary["num_timeouts"] = sum(sum(row["timed_out"]) for row in rows)
    summary["num_errors"] = sum(e is not None for row in rows for e in row["error"])
    return rows, summary


def _two_decimals(value: float) -> str:
    return str(Decimal(repr(float(value))).quantize(_CENT, rounding=ROUND_HALF_UP))


def _mean_of_shown(shown: Sequence[str]) -> str:
    # The paper averages the printed two-decimal cells (its Avg column checks out only that way:
    # (16.67 + 16.67 + 49.40 + 75.80) / 4 = 39.635 -> 39.64, while the exact fractions give
    # 39.63), so we do too, in decimal arithmetic to round half up exactly.
    total = sum((Decimal(cell) for cell in shown), Decimal(0))
    return str((total / len(shown)).quantize(_CENT, rounding=ROUND_HALF_UP))


def display_name(benchmark: str) -> str:
    """A benchmark's name in table headers (AIME24, MATH500, ...)."""
    return _DISPLAY_NAMES.get(benchmark, benchmark.upper())


def render_table(header: Sequence[str], rows: Sequence[Sequence[str | None]], numeric_from: int) -> tuple[str, str]:
    """Every palign table as `(markdown, csv)`: columns from `numeric_from` on are right-aligned in
    Markdown; a None cell is MISSING there and empty in the CSV."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i >= numeric_from else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(MISSING if c is None else c for c in row) + " |" for row in rows]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if c is None else c for c in row] for row in rows)
    return "\n".join(lines) + "\n", buffer.getvalue()


def results_table(
    results: Mapping[tuple[str, str], Mapping[str, Mapping[str, float]]],
    k: int = 3,
    benchmarks: Sequence[str] = PAPER_BENCHMARKS,
    pass1_key: str = "pass@1",
) -> tuple[str, str]:
    """Table 1 as `(markdown, csv)`.

    Args:
        results: `results[(student, method)][benchmark]` is a summary with the keys `pass@1`
            and `pass@{k}` in percent (as from `summarize_correctness`); benchmark keys are the
            config names ("aime25", "aime24", "amc12", "math500").
        k: the Pass@k column next to Pass@1 (3 in the paper).
        benchmarks: column order.
        pass1_key: which summary key fills the Pass@1 columns: "pass@1" (mean over samples) or
            "pass@1_first" (first sample); the paper does not say which it reports (§7.4).

    One row per (student, method); per benchmark a Pass@1 and a Pass@k column, then Avg: the
    unweighted mean over the benchmarks this row has, taken over the printed two-decimal values
    as the paper does. Values have 2 decimals (half up); a missing cell is "–" in Markdown and
    empty in CSV.
    """
    metrics = (pass1_key, f"pass@{k}")
    labels = ("Pass@1", f"Pass@{k}")
    header = (
        ["Student", "Method"]
        + [f"{display_name(b)} {label}" for b in benchmarks for label in labels]
        + [f"Avg {label}" for label in labels]
    )

    table: list[list[str | None]] = []
    for (student, method), per_benchmark in results.items():
        unknown = sorted(set(per_benchmark) - set(benchmarks))
        if unknown:
            raise ValueError(
                f"results for ({student}, {method}) include benchmarks {unknown} that are not table "
                f"columns {list(benchmarks)}; pass them in `benchmarks`"
            )
        cells: list[str | None] = [student, method]
        for benchmark in benchmarks:
            summary = per_benchmark.get(benchmark, {})
            cells += [_two_decimals(summary[m]) if m in summary else None for m in metrics]
        for metric in metrics:
            present = [b for b in benchmarks if metric in per_benchmark.get(b, {})]
            shown = [_two_decimals(per_benchmark[b][metric]) for b in present]
            cells.append(_mean_of_shown(shown) if shown else None)
        table.append(cells)

    return render_table(header, table, numeric_from=2)
