"""Grading: boxed extraction, answer normalisation, math-verify verdicts, the hard-timeout pool,
and the paper's Pass@3 = 26.67 reproduced from the authors' released AIME outputs."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from palign.artifacts.errors import DataFormatError
from palign.grading import (
    GradeResult,
    GradingPool,
    answer_to_text,
    extract_boxed_answer,
    is_correct,
    math_verify_grade,
)
from tests.conftest import SHARED_DATA

REFERENCE = SHARED_DATA / "reference"


# Module-level grading functions: the pool sends them to spawned workers by pickling, so every
# worker imports this module; `grade_prediction_file` (which pulls in torch via the metrics) is
# imported inside the tests that need it to keep worker start-up fast.
def hang_on_marker(output: str, gold: object) -> tuple[bool, str | None]:
    """Hangs forever on the output "hang", dies on "crash", raises on "raise"; else exact match."""
    if output == "hang":
        while True:
            time.sleep(60)
    if output == "crash":
        os._exit(3)
    if output == "raise":
        raise ValueError("cannot grade this")
    return output == str(gold), output


# --- extract_boxed_answer -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b^{2}}}} done", r"\sqrt{\frac{a}{b^{2}}}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{3}", "3"),
        (r"\boxed{1} and at last \fbox{7}", "7"),
        (r"\fbox{7} but then \boxed{8}", "8"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{}", ""),
        ("no box at all, answer 42", None),
        (r"\boxed{12} then the output was cut off \boxed{\frac{3", None),
    ],
)
def test_extract_boxed_answer(text: str, expected: str | None) -> None:
    assert extract_boxed_answer(text) == expected


# --- answer_to_text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (70, "70"),
        (142.0, "142"),
        (0.25, "0.25"),
        (-3.0, "-3"),
        ("  204\n", "204"),
        (r"\frac{1}{2}", r"\frac{1}{2}"),
    ],
)
def test_answer_to_text(answer: object, expected: str) -> None:
    assert answer_to_text(answer) == expected


@pytest.mark.parametrize("bad", [True, None, [1]])
def test_answer_to_text_rejects_other_types(bad: object) -> None:
    with pytest.raises(TypeError):
        answer_to_text(bad)


# --- is_correct --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "gold", "expected"),
    [
        (r"Thus the answer is \boxed{\frac{1}{2}}.", "0.5", True),
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", True),
        (r"The total is \boxed{142}.", 142.0, True),
        (r"The total is \boxed{70}.", 70, True),
        (r"We tried \boxed{3} first but the final answer is \boxed{5}.", 5, True),
        (r"We tried \boxed{5} first but the final answer is \boxed{3}.", 5, False),
        (r"The answer is \boxed{71}.", 70, False),
        ("I could not solve it.", 70, False),
    ],
)
def test_is_correct(output: str, gold: object, expected: bool) -> None:
    assert is_correct(output, gold) is expected


def test_is_correct_counts_a_failure_as_wrong() -> None:
    assert is_correct(r"\boxed{1}", None) is False  # an unusable gold raises inside, graded wrong


def test_math_verify_grade_reports_what_it_extracted() -> None:
    assert math_verify_grade(r"\boxed{\frac{1}{2}}", "0.5") == (True, r"\frac{1}{2}")


# --- GradingPool -------------------------------------------------------------------------------


def grade_with_watchdog(pool: GradingPool, pairs: list[tuple[str, object]], limit_s: float) -> list[GradeResult]:
    """`pool.grade(pairs)`, failing the test (instead of hanging it) if it takes over `limit_s`."""
    outcome: list[list[GradeResult]] = []
    thread = threading.Thread(target=lambda: outcome.append(pool.grade(pairs)), daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"grading stalled for over {limit_s} s: the hung item was not killed"
    return outcome[0]


def test_pool_kills_a_hung_item_and_grades_the_rest() -> None:
    pairs = [("1", 1), ("hang", 2), ("3", 3), ("x", 4), ("5", 5)]
    others = set(multiprocessing.active_children())  # processes of earlier tests are not this pool's
    with GradingPool(num_workers=1, timeout_s=1.0, grade_fn=hang_on_marker) as pool:
        results = grade_with_watchdog(pool, pairs, limit_s=60)
        assert pool.num_timeouts == 1
    assert set(multiprocessing.active_children()) - others == set()  # the hung worker was killed, not leaked
    assert [r.correct for r in results] == [True, False, True, False, True]
    assert [r.timed_out for r in results] == [False, True, False, False, False]
    assert results[1].error is not None and "timed out" in results[1].error
    assert results[2] == GradeResult(correct=True, extracted="3")


def test_pool_survives_a_crashing_worker_and_reports_errors() -> None:
    pairs = [("crash", 1), ("raise", 2), ("3", 3)]
    with GradingPool(num_workers=2, timeout_s=30.0, grade_fn=hang_on_marker) as pool:
        results = pool.grade(pairs)
    assert [r.correct for r in results] == [False, False, True]
    assert "exit code 3" in (results[0].error or "")
    assert results[1].error == "ValueError: cannot grade this"
    assert not any(r.timed_out for r in results)


def test_in_process_grading_matches_the_worker_contract() -> None:
    pool = GradingPool(num_workers=0, grade_fn=hang_on_marker)
    results = pool.grade([("1", 1), ("raise", 2), ("x", 3)])
    assert [r.correct for r in results] == [True, False, False]
    assert results[1].error == "ValueError: cannot grade this"
    assert pool.grade([]) == []


def test_pool_rejects_an_unpicklable_grading_function() -> None:
    with pytest.raises(TypeError, match="module-level function"):
        GradingPool(num_workers=1, grade_fn=lambda output, gold: (True, None))


# --- authors' released outputs: the paper's Pass@3 -------------------------------------------


@pytest.fixture(scope="module")
def worker_pool():
    with GradingPool(num_workers=2, timeout_s=10.0) as pool:
        yield pool


@pytest.mark.parametrize(
    ("benchmark", "per_sample_correct", "mean_pass1"),
    [("aime24", [6, 5, 5], 17.78), ("aime25", [5, 4, 3], 13.33)],
)
def test_reference_outputs_reproduce_paper_pass_at_3(
    worker_pool: GradingPool, benchmark: str, per_sample_correct: list[int], mean_pass1: float
) -> None:
    from palign.evaluation.predictions import grade_prediction_file

    path = REFERENCE / f"palign_qwen25_7b_{benchmark}_outputs.jsonl"
    if not path.exists():
        pytest.skip(f"shared reference data not found at {path} (needs ../shared/data next to the repo)")
    rows, summary = grade_prediction_file(path, worker_pool)
    assert round(summary["pass@3"], 2) == 26.67  # 8/30, Table 1
    assert sum(any(row["correct"]) for row in rows) == 8
    assert [sum(row["correct"][j] for row in rows) for j in range(3)] == per_sample_correct
    assert round(summary["pass@1"], 2) == mean_pass1
    assert round(summary["pass@1_first"], 2) == round(100 * per_sample_correct[0] / 30, 2)
    assert summary["num_problems"] == 30 and summary["num_samples"] == 3
    assert summary["num_timeouts"] == 0 and summary["num_errors"] == 0


def test_prediction_file_errors_name_file_line_and_field(tmp_path: Path) -> None:
    from palign.evaluation.predictions import grade_prediction_file

    path = tmp_path / "preds.jsonl"
    lines = [
        json.dumps({"answer": "1", "output": [r"\boxed{1}", r"\boxed{2}"]}),
        "",
        json.dumps({"answer": "2", "output": [r"\boxed{2}"]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    pool = GradingPool(num_workers=0)
    with pytest.raises(DataFormatError, match=r"preds\.jsonl:3: field 'output' has 1 samples"):
        grade_prediction_file(path, pool)

    path.write_text(json.dumps({"output": ["x"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"preds\.jsonl:1: missing field 'answer'"):
        grade_prediction_file(path, pool)


def test_prediction_file_rows_keep_per_sample_grades(tmp_path: Path) -> None:
    from palign.evaluation.predictions import grade_prediction_file

    path = tmp_path / "preds.jsonl"
    records = [
        {"id": "a", "problem": "p", "answer": 142.0, "output": [r"\boxed{142}", r"\boxed{7}"]},
        {"prompt_ori": "q", "answer": "1/2", "output": [r"\boxed{3}", r"\boxed{0.5}"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, summary = grade_prediction_file(path, GradingPool(num_workers=0))
    assert [row["id"] for row in rows] == ["a", "1"]
    assert rows[0]["answer"] == "142" and rows[1]["problem"] == "q"
    assert [row["correct"] for row in rows] == [[True, False], [False, True]]
    assert rows[0]["extracted"] == ["142", "7"]
    assert summary["pass@1"] == pytest.approx(50.0)
    assert summary["pass@1_first"] == pytest.approx(50.0)
    assert summary["pass@2"] == pytest.approx(100.0)
