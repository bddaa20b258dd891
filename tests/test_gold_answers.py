"""A gold answer is mathematics, or nothing is graded against it (palign/grading.py: gold_answer_problem).

Placeholders (`see solution`, `N/A`, `TBD`, `abc`) and words (`No integer solutions`) parse in
math-verify as products of letters, so without the rule every sample of such a problem is graded
wrong and nobody is told. The same rule refuses them, naming file, line and field, in benchmark files
and prediction files (`stage=grade`), and reads them as "no gold answer" in teacher files, where an
answer is optional (named in a warning; `only_correct` drops and counts them). Real answers of every
kind the paper's benchmarks and the teacher traces hold are never refused: checked over a list and
over every gold answer in ../shared/data. Grading is real math-verify.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from palign.artifacts.errors import DataFormatError
from palign.evaluation.benchmarks import load_benchmark
from palign.evaluation.predictions import grade_prediction_file
from palign.grading import GradingPool, check_gold_answer, gold_answer_problem
from palign.llm.hf_backend import HFBackend
from palign.teachers.sources import GeneratedTeacher, JsonlTeacher
from tests.conftest import SHARED_DATA

PLACEHOLDERS = [
    "see solution",
    "See the solution above.",
    "(see solution)",
    "\\text{see solution}",
    "N/A",
    "n/a",
    "NA",
    "n.a.",
    "#N/A",
    "\\text{N/A}",
    "TBD",
    "T.B.D.",
    "TODO",
    "abc",
    "none",
    "None",
    "null",
    "NaN",
    "unknown",
    "?",
    "-",
]
WORDS = ["No integer solutions", "The limit does not exist", "n times", "keine Lösung"]
REAL = [
    "x = 2",
    "\\pi",
    "(a, b)",
    "\\text{(C)}",
    "(C)",
    "C",
    "\\textbf{(E)}",
    "\\frac{1}{2}",
    "\\dfrac{3}{4}",
    "1/2",
    "2\\sqrt{3}",
    "10^{6}",
    "5\\text{ cm}",
    "12 inches",
    "3 \\text{ cm}^2",
    "90^\\circ",
    "\\$1.50",
    "5\\%",
    "0.25",
    "[0,1)",
    "(-\\infty, 2]",
    "\\{1, 2\\}",
    "\\infty",
    "x^2 + 1",
    "p - q",
    "\\cot x",
    "D, E",
    "\\text{A,B}",
    "LQSX",
    "xy",
    "a b c",
    "\\text{Evelyn}",
    "\\text{two lines}",
    "\\mbox{four}",
    "yes",
    "east",
    70,
    142.0,
    "-3",
]


@pytest.mark.parametrize("gold", PLACEHOLDERS)
def test_a_placeholder_is_refused(gold):
    with pytest.raises(
        DataFormatError,
        match=re.escape(
            f"bench.jsonl:4: field 'answer': the gold answer '{gold}' is a placeholder, not an answer, so every sample"
        ),
    ):
        check_gold_answer(gold, "bench.jsonl:4", "answer")


@pytest.mark.parametrize("gold", WORDS)
def test_words_are_refused(gold):
    with pytest.raises(
        DataFormatError,
        match=re.escape(
            f"bench.jsonl:4: field 'answer': the gold answer '{gold}' is "
            "words, not mathematics (no number, no operator; write a worded "
            "answer as \\text{...}), so every sample"
        ),
    ):
        check_gold_answer(gold, "bench.jsonl:4", "answer")


@pytest.mark.parametrize("gold", REAL, ids=str)
def test_a_real_answer_is_not_refused(gold):
    assert gold_answer_problem(gold) is None


def shared_gold_answers() -> list[tuple[str, object]]:
    """Every gold answer of the benchmarks, the teacher traces and the authors' prediction files in
    ../shared/data, with where it is (GSM8K's is what follows `####` in its answer field)."""
    golds = []
    for path in [
        *sorted((SHARED_DATA / "benchmarks").glob("*.jsonl")),
        *sorted((SHARED_DATA / "teacher").glob("*.jsonl")),
        *sorted((SHARED_DATA / "reference").glob("*.jsonl")),
    ]:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            row = json.loads(line)
            gold = row["gt"] if "gt" in row else row["answer"]
            golds.append((f"{path.name}:{lineno}", gold.split("####")[-1] if path.name == "gsm8k.jsonl" else gold))
    return golds


def test_no_gold_answer_of_the_shared_benchmarks_or_teacher_traces_is_refused(shared_data):
    golds = shared_gold_answers()
    assert len(golds) == 30 + 30 + 83 + 500 + 40 + 1319 + 40 + 30 + 100 + 30 + 30
    refused = [(where, gold, problem) for where, gold in golds if (problem := gold_answer_problem(gold))]
    assert refused == []


# -- the same rule where gold answers are read ----------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_benchmark_with_a_placeholder_is_refused_naming_file_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "bench.jsonl", [{"problem": "p1", "gt": "\\frac{1}{2}"}, {"problem": "p2", "gt": "TBD"}]
    )
    with pytest.raises(
        DataFormatError, match=re.escape(f"{path}:2: field 'gt': the gold answer 'TBD' is a placeholder")
    ):
        load_benchmark("bench", local_path=path, answer_field="gt")


def test_a_prediction_file_with_words_for_an_answer_is_refused_before_grading(tmp_path):
    rows = [{"answer": "2", "output": ["\\boxed{2}"]}, {"answer": "see solution", "output": ["\\boxed{see solution}"]}]
    path = write_jsonl(tmp_path / "preds.jsonl", rows)
    with (
        GradingPool(num_workers=0) as pool,
        pytest.raises(
            DataFormatError,
            match=re.escape(f"{path}:2: field 'answer': the gold answer 'see solution' is a placeholder"),
        ),
    ):
        grade_prediction_file(path, pool)


def test_a_teacher_placeholder_is_no_gold_answer_named_and_counted(tmp_path, caplog):
    good = {"question": "What is 1+1?", "long_cot": "One plus one is two, so \\boxed{2}."}
    rows = [dict(good, gt="2"), dict(good, gt="N/A"), dict(good, gt="see solution"), dict(good, gt=None)]
    path = write_jsonl(tmp_path / "teacher.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="palign.teachers.sources"):
        records = JsonlTeacher.with_defaults(path=str(path), answer_field="gt").load().records
    assert [r.answer for r in records] == ["2", None, None, None]
    (warning,) = [m for m in caplog.messages if "cannot be graded against" in m]
    assert f"{path}:2: field 'gt': the gold answer 'N/A' is a placeholder" in warning
    assert f"{path}:3: field 'gt': the gold answer 'see solution' is a placeholder" in warning
    # only_correct grades the traces against the gold answers: these are dropped, each counted
    data = JsonlTeacher.with_defaults(path=str(path), answer_field="gt", only_correct=True).load()
    assert [r.id for r in data.records] == ["0"]
    assert dict(data.skipped) == {
        "gold answer cannot be graded against (only_correct)": 2,
        "no gold answer (only_correct)": 1,
    }


def test_generated_traces_are_never_graded_against_a_placeholder(tmp_path):
    # the problems' answers are checked before any trace is generated, graded and stored against them
    path = write_jsonl(
        tmp_path / "problems.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "TBD"}]
    )
    teacher = GeneratedTeacher.with_defaults(
        model={},
        problems={"kind": "file", "path": str(path)},
        sampling={},
        cache_dir=str(tmp_path / "cache"),
        prompts={},
        backend=HFBackend(),
    )
    assert teacher._problems() == [("0", "1+1?", "2"), ("1", "2+2?", None)]
