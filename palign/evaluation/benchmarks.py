"""The four evaluation benchmarks of Table 1: AIME24, AIME25, AMC12, MATH500 (paper §3, §7.1).

Each benchmark is described by a plain config node in `conf/benchmark/*.yaml` whose keys are the
arguments of `load_benchmark`. A benchmark is read from its local JSON/JSONL copy (`local_path`:
the authors' own test files, kept in the shared data folder), or from the Hugging Face Hub when
`local_path` is null. A `local_path` that does not exist is an error, never a quiet switch to the
Hub copy, whose problems, order and answers may differ from the file the user meant. The files
disagree on field names and on the type of `answer` (str, int or float such as AMC12's `142.0`),
so every answer is normalised to the text math-verify will be given, and a gold answer nothing can
be graded against is an error naming file, line and field: a placeholder (`N/A`, `see solution`),
words (`No integer solutions`) or what math-verify cannot parse would grade every sample of its
problem wrong (the rule: palign/grading.py, `gold_answer_problem`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.artifacts.errors import DataFormatError
from palign.artifacts.readers import iter_records, record_id, require_field
from palign.grading import answer_to_text, check_gold_answer


@dataclass(frozen=True)
class BenchmarkProblem:
    """One evaluation problem; `answer` is already normalised text (see `answer_to_text`)."""

    id: str
    problem: str
    answer: str


def _problem_from_record(
    record: Mapping[str, Any],
    where: str,
    index: int,
    problem_field: str,
    answer_field: str,
    id_field: str | None,
) -> BenchmarkProblem:
    problem = require_field(record, problem_field, where)
    raw_answer = require_field(record, answer_field, where)
    try:
        answer = answer_to_text(raw_answer)
    except TypeError as err:
        raise DataFormatError(f"{where}: field '{answer_field}': {err}") from err
    if not answer:
        raise DataFormatError(f"{where}: field '{answer_field}' is empty; every problem needs a gold answer")
    if not isinstance(problem, str) or not problem.strip():
        raise DataFormatError(f"{where}: field '{problem_field}' must be a non-empty string, got {problem!r:.80}")
    problem_id = (
        record_id(
            require_field(record, id_field, where),
            id_field,
            where,
            "set `id_field` to a field that holds ids, or to null to number problems by row",
        )
        if id_field
        else str(index)
    )
    return BenchmarkProblem(id=problem_id, problem=problem, answer=answer)


def load_benchmark(
    name: str,
    local_path: str | os.PathLike | None = None,
    hub_id: str | None = None,
    hub_split: str = "test",
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
    limit: int | None = None,
    package: str | None = None,
    exclude_ids: Sequence[str] = (),
    numeric_answers_only: bool = False,
) -> list[BenchmarkProblem]:
    """Load benchmark `name` from `local_path`, from the Hub (`local_path` null), or from an
    installed data package (`package: champ`, the offline default's held-out problems).

    Args:
        name: short name used in messages and result tables (e.g. "aime24").
        local_path: a `.jsonl` file or a `.json` list of objects; it must exist. Null reads the
            benchmark from the Hub instead.
        hub_id, hub_split: `datasets.load_dataset(hub_id, split=hub_split)` when `local_path` is null.
        problem_field, answer_field: field names of the problem text and the gold answer.
        id_field: field holding a problem id; None numbers problems by row (0, 1, ...).
        limit: keep only the first `limit` problems (for quick runs).
        package: "champ" reads the problems of the `champ-dataset` package instead of a file.
        exclude_ids: problem ids to leave out (e.g. the problems a run trained on).
        numeric_answers_only: keep problems whose gold answer is a number (integer, decimal or
            fraction), which math-verify grades reliably.

    Raises:
        DataFormatError: a malformed line, a missing/empty field, a repeated id or a gold answer
            nothing can be graded against (a placeholder, words, or what math-verify cannot
            parse), naming file, line and field.
        FileNotFoundError: `local_path` does not exist; or it is null and there is no `hub_id`,
            or the Hub could not be reached.
    """
    rows: Iterator[tuple[str, Mapping[str, Any]]]
    if package == "champ":
        rows = _champ_rows()
        id_field = "id"
    elif package is not None:
        raise ValueError(f"benchmark '{name}': unknown package '{package}' (known: champ)")
    elif local_path is not None:
        if not Path(local_path).is_file():
            hub = (
                f"or set it to null to load '{hub_id}' from the Hugging Face Hub"
                if hub_id is not None
                else "(there is no hub_id to load it from instead)"
            )
            missing = "is not a file" if Path(local_path).exists() else "does not exist"
            raise FileNotFoundError(
                f"benchmark '{name}': local_path {local_path} {missing}; fix `local_path` "
                f"(conf/benchmark/{name}.yaml, or paths.shared_data / PALIGN_SHARED_DATA) {hub}"
            )
        rows = iter_records(local_path)
    elif hub_id is not None:
        rows = _hub_rows(name, hub_id, hub_split)
    else:
        raise FileNotFoundError(
            f"benchmark '{name}': neither local_path nor hub_id is set; set one in conf/benchmark/{name}.yaml"
        )
    problems = []
    first_seen: dict[str, str] = {}  # id -> where; ids key result stores, so they must be unique
    excluded = {str(i) for i in exclude_ids}
    for index, (where, record) in enumerate(rows):
        if limit is not None and len(problems) >= limit:
            break
        problem = _problem_from_record(record, where, index, problem_field, answer_field, id_field)
        if problem.id in excluded or (numeric_answers_only and not _NUMBER.fullmatch(problem.answer)):
            continue
        if problem.id in first_seen:
            raise DataFormatError(
                f"{where}: id '{problem.id}' (field '{id_field}') repeats {first_seen[problem.id]}; "
                "set `id_field` to a unique field, or to null to number problems by row"
            )
        first_seen[problem.id] = where
        check_gold_answer(problem.answer, where, answer_field)
        problems.append(problem)
    if not problems:
        source = local_path if local_path is not None else package or hub_id
        raise DataFormatError(f"benchmark '{name}': no problems found in {source}")
    return problems


_NUMBER = re.compile(r"-?\d+(\.\d+)?(/\d+)?")


def _champ_rows() -> Iterator[tuple[str, Mapping[str, Any]]]:
    from palign.teachers.sources import champ_problems

    for problem_id, text, answer in champ_problems():
        yield f"champ-dataset:{problem_id}", {"id": problem_id, "problem": text, "answer": answer}


def _hub_rows(name: str, hub_id: str, hub_split: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    import datasets  # heavy; only needed without a local copy

    try:
        dataset = datasets.load_dataset(hub_id, split=hub_split)
    except Exception as err:
        raise FileNotFoundError(
            f"benchmark '{name}': loading '{hub_id}' split '{hub_split}' from the Hugging Face Hub "
            f"failed (local_path is null): {err}"
        ) from err
    for index, row in enumerate(dataset):
        yield f"{hub_id}[{hub_split}] row {index}", row
