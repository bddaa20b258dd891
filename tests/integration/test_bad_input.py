"""Bad input data gets a clear error (file, line, field, how to fix it) or a counted skip, never a
silently wrong result: a corpus of broken teacher, benchmark and prediction files, undecodable
bytes, and a full disk, each through the real readers (and at least once per kind through the CLI).

Every file is written under tmp_path; grading is real math-verify in a real `GradingPool`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from palign.artifacts.errors import DataFormatError, DiskFullError
from palign.artifacts.readers import iter_records, read_json
from palign.artifacts.stores import RecordStore
from palign.artifacts.writes import write_json_atomic, write_jsonl_atomic, write_text_atomic
from palign.evaluation.benchmarks import load_benchmark
from palign.evaluation.predictions import grade_prediction_file
from palign.grading import GradingPool
from palign.llm.hf_backend import HFBackend
from palign.teachers.sources import GeneratedTeacher, JsonlTeacher, S1KTeacher
from tests.conftest import PROJECT_ROOT, cli_command, cli_env, compose_config, run_cli

GOOD = {"id": "a", "question": "What is 1+1?", "long_cot": "One plus one is two.", "answer": "2"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def where(path: Path, line: int) -> str:
    return re.escape(f"{path}:{line}:")


@pytest.fixture(scope="module")
def pool():
    with GradingPool(num_workers=1) as grading_pool:
        yield grading_pool


# -- 1. teacher fields that are null, numbers, lists or objects are never stringified ------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("question", None, "field 'question' must be a string (the problem text), got null"),
        ("question", 3, "field 'question' must be a string (the problem text), got a number (3)"),
        ("question", True, "field 'question' must be a string (the problem text), got a boolean (true)"),
        ("question", ["a", "b"], 'field \'question\' must be a string (the problem text), got a list (["a", "b"])'),
        ("question", {"text": "q"}, "field 'question' must be a string (the problem text), got an object"),
        ("long_cot", None, "field 'long_cot' must be a string (the teacher's long CoT), got null"),
        ("long_cot", ["step 1", "step 2"], "field 'long_cot' must be a string (the teacher's long CoT), got a list"),
        ("id", None, "field 'id' must be a non-empty string or an integer (the record id), got null"),
        ("id", 3.0, "field 'id' must be a non-empty string or an integer (the record id), got a number (3.0)"),
        ("id", True, "field 'id' must be a non-empty string or an integer (the record id), got a boolean (true)"),
        ("id", ["a"], "field 'id' must be a non-empty string or an integer (the record id), got a list"),
        ("id", "", "field 'id' must be a non-empty string or an integer (the record id), got an empty string"),
        (
            "answer",
            [2],
            "field 'answer' is not a usable gold answer: a gold answer must be str, int or float, got list",
        ),
        (
            "answer",
            {"value": 2},
            "field 'answer' is not a usable gold answer: a gold answer must be str, int or float, got dict",
        ),
        ("answer", False, "field 'answer' is not a usable gold answer: a gold answer cannot be a bool"),
    ],
)
def test_jsonl_teacher_rejects_a_field_of_the_wrong_type(tmp_path, field, value, expected):
    path = write_jsonl(tmp_path / "teacher.jsonl", [GOOD, {**GOOD, "id": "b", field: value}])
    with pytest.raises(DataFormatError, match=where(path, 2) + " " + re.escape(expected)):
        JsonlTeacher.with_defaults(path=str(path), id_field="id").load()


def test_jsonl_teacher_accepts_numbers_as_answers_and_integer_ids_and_null_as_no_answer(tmp_path):
    rows = [dict(GOOD, id=7, answer=142.0), dict(GOOD, id="b", answer=None), dict(GOOD, id="c", answer="")]
    path = write_jsonl(tmp_path / "teacher.jsonl", rows)
    records = JsonlTeacher.with_defaults(path=str(path), id_field="id").load().records
    assert [(r.id, r.answer) for r in records] == [("7", "142"), ("b", None), ("c", None)]
    # answers are optional: only only_correct needs one, and it counts what it drops
    data = JsonlTeacher.with_defaults(path=str(path), id_field="id", only_correct=True).load()
    assert data.skipped["no gold answer (only_correct)"] == 2


def test_jsonl_teacher_counts_empty_questions_and_traces_as_skips(tmp_path):
    rows = [GOOD, dict(GOOD, id="b", question="  "), dict(GOOD, id="c", long_cot="")]
    data = JsonlTeacher.with_defaults(path=str(write_jsonl(tmp_path / "t.jsonl", rows)), id_field="id").load()
    assert [r.id for r in data.records] == ["a"]
    assert dict(data.skipped) == {"empty question": 1, "empty teacher trace": 1}


def test_nested_fields_are_checked_too(tmp_path):
    # Sky-T1's layout: the trace is `code.0`; a null there must not become the trace "None"
    rows = [
        {"idx": 0, "question": "q", "gt": "1", "code": ["trace"]},
        {"idx": 1, "question": "q", "gt": "1", "code": [None]},
    ]
    path = write_jsonl(tmp_path / "skyt1.jsonl", rows)
    teacher = JsonlTeacher.with_defaults(path=str(path), id_field="idx", answer_field="gt", long_cot_field="code.0")
    with pytest.raises(DataFormatError, match=where(path, 2) + re.escape(" field 'code.0' must be a string")):
        teacher.load()


def test_s1k_local_file_rejects_null_and_list_fields_with_file_and_line(tmp_path):
    good = {
        "question": "1+1?",
        "solution": "$\\boxed{2}$",
        "deepseek_thinking_trajectory": "two",
        "deepseek_attempt": "2",
    }
    path = write_jsonl(tmp_path / "s1k.jsonl", [good, dict(good, question=None)])
    with pytest.raises(
        DataFormatError,
        match=where(path, 2) + re.escape(" field 'question' must be a string (the problem text), got null"),
    ):
        S1KTeacher.with_defaults(path=str(path)).load()
    write_jsonl(path, [good, dict(good, deepseek_thinking_trajectory=["a", "b"])])
    with pytest.raises(
        DataFormatError, match=where(path, 2) + re.escape(" field 'deepseek_thinking_trajectory' must be a string")
    ):
        S1KTeacher.with_defaults(path=str(path)).load()
    write_jsonl(path, [good, dict(good, deepseek_attempt={"a": 1})])
    with pytest.raises(DataFormatError, match=where(path, 2) + re.escape(" field 'deepseek_attempt' must be a string")):
        S1KTeacher.with_defaults(path=str(path)).load()
    # a bare numeric solution is a gold answer, spelt once: 42.0 -> "42"
    write_jsonl(path, [good, dict(good, solution=42.0)])
    assert [r.answer for r in S1KTeacher.with_defaults(path=str(path)).load().records] == ["2", "42"]


def generated_teacher(problems_path: Path, tmp_path: Path, **problems) -> GeneratedTeacher:
    # the problem file is read before any model is built, so no model is needed to reach the errors
    return GeneratedTeacher.with_defaults(
        model={},
        problems={"kind": "file", "path": str(problems_path), **problems},
        sampling={},
        cache_dir=str(tmp_path / "cache"),
        prompts={},
        backend=HFBackend(),
    )


def test_generated_teacher_problem_file_rejects_null_and_list_questions(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text(json.dumps([{"problem": "1+1?", "answer": "2"}, {"problem": None, "answer": "2"}]))
    with pytest.raises(
        DataFormatError,
        match=re.escape(f"{path}: record 1: field 'problem' must be a string (the problem text), got null"),
    ):
        generated_teacher(path, tmp_path).load()
    path.write_text(json.dumps([{"problem": ["1+1?"], "answer": "2"}]))
    with pytest.raises(
        DataFormatError,
        match=re.escape(f"{path}: record 0: field 'problem' must be a string (the problem text), got a list"),
    ):
        generated_teacher(path, tmp_path).load()
    path.write_text(json.dumps([{"problem": "1+1?", "answer": [2]}]))
    with pytest.raises(
        DataFormatError, match=re.escape(f"{path}: record 0: field 'answer' is not a usable gold answer")
    ):
        generated_teacher(path, tmp_path).load()


@pytest.mark.slow
def test_cli_refuses_a_null_question(tmp_path):
    path = write_jsonl(tmp_path / "teacher.jsonl", [GOOD, dict(GOOD, id="b", question=None)])
    # judge_chains reads the teacher before it loads any model: the error comes within seconds
    proc = run_cli(
        [
            "stage=judge_chains",
            "teacher=jsonl",
            f"teacher.source.path={path}",
            "teacher.source.id_field=id",
            "teacher.source.answer_field=answer",
            "teacher.source.long_cot_field=long_cot",
            "logger=none",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert f"{path}:2: field 'question' must be a string (the problem text), got null" in proc.stderr, proc.stderr[
        -3000:
    ]


# -- 2. gold answers that math-verify cannot parse are an error, in benchmarks and in stage=grade --

BAD_GOLDS = [
    ("\\frac{11}{", "math-verify cannot read the gold answer '\\frac{11}{' as a math expression"),
    ("x^2+", "math-verify cannot read the gold answer 'x^2+' as a math expression"),
]


@pytest.mark.parametrize(("gold", "expected"), BAD_GOLDS)
def test_benchmark_with_an_unparsable_gold_answer_is_an_error(tmp_path, gold, expected):
    rows = [{"problem": "p1", "gt": "\\frac{11}{3}"}, {"problem": "p2", "gt": gold}]
    path = write_jsonl(tmp_path / "bench.jsonl", rows)
    with pytest.raises(DataFormatError, match=where(path, 2) + re.escape(f" field 'gt': {expected}, so every sample")):
        load_benchmark("bench", local_path=path, answer_field="gt")


def test_benchmark_accepts_every_kind_of_gold_answer_the_paper_uses(tmp_path):
    golds = ["70", 142.0, "\\frac{11}{3}", "\\text{Evelyn}", "(3, \\frac{\\pi}{2})", "[0,1)", "\\text{(C)}"]
    path = write_jsonl(tmp_path / "bench.jsonl", [{"problem": f"p{i}", "answer": g} for i, g in enumerate(golds)])
    assert len(load_benchmark("bench", local_path=path)) == len(golds)


@pytest.mark.parametrize(
    ("gold", "expected"), [*BAD_GOLDS, ("", "the gold answer is empty"), ("  ", "the gold answer is empty")]
)
def test_prediction_file_with_an_unparsable_gold_answer_is_an_error(tmp_path, pool, gold, expected):
    rows = [{"answer": "2", "output": ["\\boxed{2}"]}, {"answer": gold, "output": ["\\boxed{2}"]}]
    path = write_jsonl(tmp_path / "preds.jsonl", rows)
    with pytest.raises(
        DataFormatError, match=where(path, 2) + re.escape(f" field 'answer': {expected}, so every sample")
    ):
        grade_prediction_file(path, pool)


def test_prediction_file_with_gradable_golds_is_graded_in_full(tmp_path, pool):
    rows = [
        {"answer": "\\frac{11}{3}", "output": ["\\boxed{\\frac{11}{3}}", "\\boxed{4}"]},
        {"answer": 142.0, "output": ["\\boxed{142}", "\\boxed{142}"]},
    ]
    rows_out, summary = grade_prediction_file(write_jsonl(tmp_path / "preds.jsonl", rows), pool)
    assert [r["correct"] for r in rows_out] == [[True, False], [True, True]]
    assert summary["pass@1"] == pytest.approx(75.0) and summary["num_errors"] == 0


@pytest.mark.slow
def test_cli_grade_refuses_an_unparsable_gold_answer(tmp_path):
    rows = [{"answer": "2", "output": ["\\boxed{2}"]}, {"answer": "\\frac{11}{", "output": ["\\boxed{2}"]}]
    path = write_jsonl(tmp_path / "preds.jsonl", rows)
    proc = run_cli(["stage=grade", f"predictions={path}", "logger=none"], tmp_path, check=False)
    assert proc.returncode != 0
    assert (
        f"{path}:2: field 'answer': math-verify cannot read the gold answer '\\frac{{11}}{{' as a math expression"
        in proc.stderr
    ), proc.stderr[-3000:]
    assert not list(tmp_path.glob("grade/*/*.graded.jsonl"))  # nothing half-graded is left behind


# -- 3. undecodable bytes, empty files, null and repeated ids -------------------------------------


def write_with_bad_byte(path: Path) -> Path:
    # line 2 holds a Latin-1 "é" (0xe9), which is not UTF-8, at byte column 17
    good = json.dumps({"problem": "p", "answer": "1", "question": "q", "long_cot": "c", "output": ["\\boxed{1}"]})
    path.write_bytes(good.encode() + b"\n" + b'{"problem": "caf\xe9", "answer": "1"}\n')
    return path


def test_invalid_utf8_names_file_line_and_column(tmp_path, pool):
    path = write_with_bad_byte(tmp_path / "latin1.jsonl")
    expected = where(path, 2) + re.escape(" invalid UTF-8 (byte 0xe9 at column 17)")
    with pytest.raises(DataFormatError, match=expected):
        list(iter_records(path))
    with pytest.raises(DataFormatError, match=expected):
        JsonlTeacher.with_defaults(path=str(path)).load()
    with pytest.raises(DataFormatError, match=expected):
        load_benchmark("latin1", local_path=path)
    with pytest.raises(DataFormatError, match=expected):
        grade_prediction_file(path, pool)


def test_invalid_utf8_in_a_json_file_names_its_line(tmp_path):
    path = tmp_path / "problems.json"
    path.write_bytes(b'[\n  {"problem": "1+1?", "answer": "2"},\n  {"problem": "\xff"}\n]\n')
    with pytest.raises(DataFormatError, match=where(path, 3) + re.escape(" invalid UTF-8 (byte 0xff at column 16)")):
        read_json(path)
    with pytest.raises(DataFormatError, match=where(path, 3) + " invalid UTF-8"):
        generated_teacher(path, tmp_path).load()


def test_record_store_reports_a_damaged_line_and_drops_only_a_torn_one(tmp_path):
    path = tmp_path / "records.jsonl"
    # a crash mid-write can cut a multi-byte character: the torn last line is dropped, not an error
    path.write_bytes('{"id": "a", "text": "ok"}\n{"id": "b", "text": "é'.encode()[:-1])
    with RecordStore(path) as store:
        assert "a" in store and "b" not in store
    assert path.read_bytes() == b'{"id": "a", "text": "ok"}\n'
    # a complete line that does not read back was damaged after writing: truncating there would drop
    # every later record, so it is an error naming the line
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "text": "\xff"}\n{"id": "c"}\n')
    with pytest.raises(DataFormatError, match=where(path, 2) + re.escape(" damaged record store: invalid UTF-8")):
        RecordStore(path)
    path.write_bytes(b'{"id": "a"}\n{"id": null}\n')
    with pytest.raises(
        DataFormatError, match=where(path, 2) + re.escape(" damaged record store: line has no value for field 'id'")
    ):
        RecordStore(path)


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("empty.jsonl", "", "is empty (0 bytes or only blank lines)"),
        ("blank.jsonl", "\n  \n\n", "is empty (0 bytes or only blank lines)"),
        ("empty.json", "[]", "holds an empty JSON list"),
    ],
)
def test_an_empty_teacher_file_says_it_is_empty(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(
        DataFormatError, match=re.escape(f"{path}: the file {what}, so there are no records; point teacher.source.path")
    ):
        JsonlTeacher.with_defaults(path=str(path)).load()
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: the file {what}")):
        S1KTeacher.with_defaults(path=str(path)).load()
    with pytest.raises(
        DataFormatError,
        match=re.escape(f"{path}: the file {what}, so there are no records; point teacher.source.problems.path"),
    ):
        generated_teacher(path, tmp_path).load()


def test_a_blank_json_file_says_it_is_empty_too(tmp_path):
    path = tmp_path / "blank.json"
    path.write_text("\n\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: the file is empty (0 bytes or only blank lines)")):
        JsonlTeacher.with_defaults(path=str(path)).load()


def test_repeated_teacher_ids_name_both_lines_and_the_field(tmp_path):
    # the first "7" is skipped (empty question), but it is still an id: the repeat is still an error
    rows = [dict(GOOD, idx=7, question=""), dict(GOOD, idx=8), dict(GOOD, idx=7)]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    expected = re.escape(
        f"{path}:3: id '7' repeats {path}:1; ids must be unique (field 'idx': set teacher.source.id_field"
    )
    with pytest.raises(DataFormatError, match=expected):
        JsonlTeacher.with_defaults(path=str(path), id_field="idx").load()
    assert [r.id for r in JsonlTeacher.with_defaults(path=str(path)).load().records] == ["1", "2"]  # numbered by row


def test_repeated_problem_ids_in_a_generation_problem_file_name_both_records(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text(
        json.dumps([{"uid": "x", "problem": "a", "answer": "1"}, {"uid": "x", "problem": "b", "answer": "2"}])
    )
    expected = re.escape(
        f"{path}: record 1: id 'x' repeats {path}: record 0; ids must be unique: set "
        "teacher.source.problems.id_field (now 'uid')"
    )
    with pytest.raises(DataFormatError, match=expected):
        generated_teacher(path, tmp_path, id_field="uid").load()


def test_null_benchmark_ids_name_the_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "bench.jsonl",
        [{"uid": "a", "problem": "p", "answer": 1}, {"uid": None, "problem": "q", "answer": 2}],
    )
    with pytest.raises(
        DataFormatError, match=where(path, 2) + re.escape(" field 'uid' must be a non-empty string or an integer")
    ):
        load_benchmark("bench", local_path=path, id_field="uid")


@pytest.mark.slow
def test_cli_grade_refuses_invalid_utf8(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(b'{"answer": "1", "output": ["\\\\boxed{1}"]}\n{"answer": "1", "output": ["caf\xe9"]}\n')
    proc = run_cli(["stage=grade", f"predictions={path}", "logger=none"], tmp_path, check=False)
    assert proc.returncode != 0
    assert f"{path}:2: invalid UTF-8 (byte 0xe9 at column 32)" in proc.stderr, proc.stderr[-3000:]


# -- messages read as written: "at" once, backslashes single, nothing written for a refused run ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"problem": "caf\u00e9', "Unterminated string starting at column 13"),  # Python's own text ends in "at"
        ('{"problem": "a\tb"}', "Invalid control character at column 15"),
        ('{"problem": }', "Expecting value at column 13"),
    ],
)
def test_a_malformed_json_message_says_where_once(tmp_path, text, expected):
    jsonl, json_file = tmp_path / "bad.jsonl", tmp_path / "bad.json"
    jsonl.write_text('{"problem": "ok"}\n' + text, encoding="utf-8")
    json_file.write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        list(iter_records(jsonl))
    assert str(info.value) == (
        f"{jsonl}:2: malformed JSON line ({expected}); each line must be one complete JSON object"
    )
    with pytest.raises(DataFormatError) as info:
        read_json(json_file)
    assert str(info.value) == f"{json_file}:1: malformed JSON ({expected})"


def test_a_damaged_record_store_line_says_where_once(tmp_path):
    store = tmp_path / "records.jsonl"
    store.write_text('{"id": "a"}\n{"id": "b", "text": "a\tb"}\n{"id": "c"}\n', encoding="utf-8")
    with pytest.raises(
        DataFormatError,
        match=re.escape(
            f"{store}:2: damaged record store: malformed JSON (Invalid control character at column 23); delete"
        ),
    ):
        RecordStore(store)


@pytest.mark.slow
def test_cli_a_refused_config_writes_nothing_at_all(tmp_path):
    root = tmp_path / "root"
    proc = run_cli(
        [
            "student=tiny_random",
            "logger=none",
            "teacher=jsonl",
            f"teacher.source.path={tmp_path}/gone.jsonl",
            f"paths.root={root}",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert (
        "this run would fail; nothing was loaded or written:\n"
        f"  teacher.source.path={tmp_path}/gone.jsonl: does not exist"
    ) in proc.stderr, proc.stderr[-3000:]
    assert not root.exists()  # no run folder, and no Hydra folder (.hydra/, the job's log) either


@pytest.mark.slow
def test_cli_a_bad_gold_answer_in_a_benchmark_is_shown_as_written(tmp_path):
    # evaluation runs inside Hydra's instantiate of the evaluation node: its errors must not come back as
    # Hydra's InstantiationException, which shows the error's repr (every backslash doubled, quoted)
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"id": 1, "problem": "p", "answer": "\\frac{11}{"}])
    proc = run_cli(
        [
            "stage=eval",
            "student=tiny_random",
            "evaluation=paper",
            f"evaluation.benchmarks.aime24.local_path={bench}",
            "logger=none",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    # read before anything loads (palign/preflight.py reads every local benchmark as evaluation will)
    assert (
        f"evaluation.benchmarks.aime24: {bench}:1: field 'answer': math-verify cannot read the gold answer "
        "'\\frac{11}{' as a math expression, so every sample of this problem would be graded wrong; fix the gold "
        "answer (a complete LaTeX or plain expression such as \\frac{11}{3}) or remove the problem"
    ) in proc.stderr, proc.stderr[-3000:]
    assert "\\\\" not in proc.stderr and "Error in call to target" not in proc.stderr
    assert not (tmp_path / "runs").exists()


# -- 4. a benchmark local_path that does not exist never falls back to the Hub -------------------


def test_missing_local_path_is_an_error_even_with_a_hub_id(tmp_path):
    missing = tmp_path / "benchmarks" / "aime24.jsonl"
    expected = (
        re.escape(f"benchmark 'aime24': local_path {missing} does not exist; fix `local_path`")
        + ".*"
        + re.escape("or set it to null to load 'HuggingFaceH4/aime_2024' from the Hugging Face Hub")
    )
    with pytest.raises(FileNotFoundError, match=expected):
        load_benchmark("aime24", local_path=missing, hub_id="HuggingFaceH4/aime_2024", hub_split="train")
    with pytest.raises(FileNotFoundError, match=re.escape(f"local_path {tmp_path} is not a file")):
        load_benchmark("aime24", local_path=tmp_path, hub_id="HuggingFaceH4/aime_2024")  # a folder is not a file


def test_shipped_benchmark_configs_point_at_existing_files(tmp_path, shared_data):
    cfg = compose_config(["evaluation=paper", f"paths.shared_data={shared_data}"], tmp_path)
    for name, node in cfg.evaluation.benchmarks.items():
        bench = OmegaConf.to_container(node, resolve=True)
        assert bench.pop("exclude_training") is False  # the pipeline turns it into exclude_ids
        assert Path(bench["local_path"]) == shared_data / "benchmarks" / f"{name}.jsonl"
        assert len(load_benchmark(**dict(bench, limit=3))) == 3


@pytest.mark.slow
def test_cli_eval_refuses_a_missing_benchmark_file(tmp_path):
    missing = tmp_path / "nowhere" / "aime24.jsonl"
    proc = run_cli(
        [
            "stage=eval",
            "student=tiny_random",
            "evaluation=paper",
            f"evaluation.benchmarks.aime24.local_path={missing}",
            "logger=none",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    # refused before anything loads (palign/preflight.py), the Hub named as the way out, not taken
    assert (
        f"evaluation.benchmarks.aime24.local_path={missing}: does not exist; point it at a benchmark file "
        "(.jsonl or .json), or set it to null to read HuggingFaceH4/aime_2024 from the Hub"
    ) in proc.stderr, proc.stderr[-3000:]


# -- 5. a full disk names the file and says so ----------------------------------------------------

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux /dev/full")


def temp_folders_on_a_full_disk(monkeypatch, name: str) -> None:
    """Make atomic writes of `name` land on /dev/full, whose every write fails with ENOSPC.

    The one thing patched is *where* the temporary folder is: `atomic_path` writes into a fresh
    `mkdtemp` folder, so this hands it one whose `name` is a symlink to /dev/full. The write, the
    ENOSPC and everything after it are real.
    """
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp_on_full_disk(*args, **kwargs):
        folder = Path(real_mkdtemp(*args, **kwargs))
        (folder / name).symlink_to("/dev/full")
        return str(folder)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_on_full_disk)


@needs_dev_full
@pytest.mark.parametrize(
    "write",
    [
        lambda path: write_text_atomic(path, "x" * 100),
        lambda path: write_json_atomic(path, {"a": 1}),
        lambda path: write_jsonl_atomic(path, [{"a": i} for i in range(10_000)]),  # fails mid-file, not at close
    ],
)
def test_atomic_writes_on_a_full_disk_name_the_file(tmp_path, monkeypatch, write):
    target = tmp_path / "out" / "result.json"
    temp_folders_on_a_full_disk(monkeypatch, target.name)
    with pytest.raises(
        DiskFullError, match=re.escape(f"{target}: disk full (no space left on device) while writing")
    ) as info:
        write(target)
    assert info.value.errno == errno.ENOSPC
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert os.listdir(target.parent) == []  # neither the target nor a temporary folder is left


@needs_dev_full
def test_record_store_on_a_full_disk_names_the_store(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordStore(path) as store:
        path.symlink_to("/dev/full")  # the store opens its file on the first add: that open lands on /dev/full
        with pytest.raises(DiskFullError, match=re.escape(f"{path}: disk full (no space left on device)")) as info:
            store.add({"id": "a", "text": "x"})
        assert info.value.__cause__.errno == errno.ENOSPC
        assert "a" not in store  # not counted as done: a rerun computes it again


def test_record_store_over_quota_keeps_only_complete_records(tmp_path, monkeypatch):
    # No real way to exceed a quota here: this one test makes `os.fsync` fail with EDQUOT, after the
    # line really reached the file, to check the error and that the half-committed line is removed.
    path = tmp_path / "records.jsonl"
    with RecordStore(path) as store:
        store.add({"id": "a"})
        real_fsync = os.fsync

        def fsync_over_quota(fd):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

        monkeypatch.setattr(os, "fsync", fsync_over_quota)
        with pytest.raises(DiskFullError, match=re.escape(f"{path}: disk full (disk quota exceeded)")):
            store.add({"id": "b"})
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert path.read_text() == '{"id": "a"}\n'
        store.add({"id": "c"})  # the store carries on once there is room again
    assert [r["id"] for r in RecordStore(path).records()] == ["a", "c"]


def _private_tmpfs_works(mount: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=4k tmpfs "$0"', str(mount)], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.slow
def test_cli_on_a_full_disk_names_the_file(tmp_path):
    # A real full disk, private to the run: a 64 KiB tmpfs mounted in the subprocess's own mount
    # namespace (nothing outside it sees the mount, and it vanishes with the process). The run's
    # config (~6 KB) fits; the per-sample grades, which carry a 128 KB problem text, do not.
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _private_tmpfs_works(disk):
        pytest.skip("needs `unshare -rm` and tmpfs mounts in a user namespace")
    preds = write_jsonl(
        tmp_path / "preds.jsonl", [{"problem": "x" * 128 * 1024, "answer": "1", "output": ["\\boxed{1}"]}]
    )
    args = [
        "stage=grade",
        f"predictions={preds}",
        "logger=none",
        "evaluation.grading.workers=1",
        f"paths.root={disk}",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    command = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"',
        str(disk),
        *cli_command(args),
    ]
    proc = subprocess.run(command, cwd=PROJECT_ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    expected = (
        re.escape(str(disk))
        + r"/grade/grade-[0-9a-f]+/preds\.graded\.jsonl: disk full \(no space left on device\) while writing"
    )
    assert re.search(expected, proc.stderr), proc.stderr[-3000:]


# -- 6. stage=grade keeps the per-sample grades, as evaluation does ------------------------------


@pytest.mark.slow
def test_cli_grade_writes_per_sample_grades(tmp_path):
    rows = [
        {"id": "p1", "answer": "\\frac{11}{3}", "output": ["\\boxed{\\frac{11}{3}}", "\\boxed{3}"]},
        {"id": "p2", "answer": 142.0, "output": ["\\boxed{7}", "\\boxed{142}"]},
    ]
    preds = write_jsonl(tmp_path / "mine.jsonl", rows)
    run_cli(["stage=grade", f"predictions={preds}", "logger=none", "evaluation.grading.workers=1"], tmp_path)
    (graded,) = tmp_path.glob("grade/*/mine.graded.jsonl")
    lines = [json.loads(line) for line in graded.read_text().splitlines()]
    assert [(r["id"], r["answer"], r["correct"]) for r in lines] == [
        ("p1", "\\frac{11}{3}", [True, False]),
        ("p2", "142", [False, True]),
    ]
    assert lines[1]["output"] == rows[1]["output"] and lines[1]["extracted"] == ["7", "142"]
    assert set(lines[0]) == {"id", "problem", "answer", "output", "correct", "extracted", "timed_out", "error"}
    summary = json.loads((graded.parent / "summary.json").read_text())
    assert summary["graded"][str(preds)]["graded"] == str(graded)
    assert summary["graded"][str(preds)]["pass@1"] == pytest.approx(50.0)


def test_nan_and_infinity_are_never_written_into_json(tmp_path, caplog):
    from palign.artifacts.stores import RecordStore
    from palign.artifacts.writes import write_json_atomic, write_jsonl_atomic

    value = {"loss": float("nan"), "curve": [1.0, float("inf")], "ok": 2.5}
    write_json_atomic(tmp_path / "a.json", value)
    write_jsonl_atomic(tmp_path / "b.jsonl", [dict(value, id="x")])
    with RecordStore(tmp_path / "c.jsonl") as store:
        store.add(dict(value, id="y"))
    for name in ("a.json", "b.jsonl", "c.jsonl"):
        text = (tmp_path / name).read_text()
        assert "NaN" not in text and "Infinity" not in text
        parsed = json.loads(text.splitlines()[0] if name.endswith("l") else text, parse_constant=pytest.fail)
        assert parsed["loss"] is None and parsed["curve"] == [1.0, None] and parsed["ok"] == 2.5
    assert any("loss is nan; written as null" in m for m in caplog.messages)
    assert any("curve[1] is inf" in m for m in caplog.messages)


# -- long inputs: searched within the judge's context, counted, with progress ---------------------


@pytest.mark.slow
def test_cli_a_200k_character_trace_is_searched_within_the_judges_context_not_for_minutes(tmp_path):
    sentences = " ".join(f"Step {i}: we add {i} to the running total and check the parity again." for i in range(3000))
    assert len(sentences) > 200_000
    records = [dict(GOOD, id="short-1"), dict(GOOD, id="huge", long_cot=sentences), dict(GOOD, id="short-2")]
    path = write_jsonl(tmp_path / "teacher.jsonl", records)
    proc = run_cli(
        [
            "stage=truncate",
            "student=tiny_random",
            "baseline=prefix_only",
            "logger=none",
            "teacher=jsonl",
            f"teacher.source.path={path}",
            "teacher.source.id_field=id",
            "teacher.source.answer_field=answer",
            "teacher.source.long_cot_field=long_cot",
            "teacher.source.only_correct=false",
            "data.val_size=0",
            "truncation.judge.max_context_tokens=2048",
        ],
        tmp_path,
    )
    (run_dir,) = list((tmp_path / "runs").iterdir())
    stats = json.loads((run_dir / "summary.json").read_text())["truncation"]
    # every trace has its prefix; the huge one's probes beyond 2048 tokens were counted, never sent
    assert stats["examples"] == 3 and stats["examples_over_context"] == 1 and stats["probes_over_context"] >= 1
    (store,) = [p for p in (tmp_path / "cache" / "truncation").rglob("*.jsonl")]
    huge = next(row for row in map(json.loads, store.read_text().splitlines()) if row["id"] == "huge")
    assert (
        huge["fitting_k"] < huge["m"] and huge["probes"][0]["over_context"]
    )  # the first probe, half the trace, is over
    log = proc.stdout + proc.stderr
    assert re.search(r"truncation: 3/3 traces", log), log[-3000:]  # progress, one line per chunk
