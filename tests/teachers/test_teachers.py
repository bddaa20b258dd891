"""Teacher sources: CHAMP from its package, Sky-T1 JSONL traces, s1K schema, clear input errors."""

from __future__ import annotations

import json

import pytest

from palign.artifacts.errors import DataFormatError
from palign.teachers.sources import ChampTeacher, JsonlTeacher, S1KTeacher


def test_champ_loads_all_270_problems_with_answers_and_both_cots():
    data = ChampTeacher.with_defaults(model="GPT-4", setting="0-Shot").load()
    # all 270 problems are read; GPT-4's replies to two were cut at its length limit: skipped, counted
    assert len(data.records) == 268
    assert dict(data.skipped) == {"teacher reply missing or cut at length": 2}
    # 28 answers are words ("No integer solutions", "The limit does not exist"): nothing can be graded
    # against them, so they are no gold answer; every other problem keeps its answer
    worded = {r.id: r for r in data.records if r.answer is None}
    assert len(worded) == 28 and "P_Number-Theory_7" in worded
    assert all(r.answer for r in data.records if r.id not in worded)
    assert all(r.short_cot and r.long_cot for r in data.records)
    first = next(r for r in data.records if r.id == "P_Combinatorics_1")
    assert first.answer == "239"
    assert first.long_cot.startswith("To solve this problem")
    assert first.source["teacher"] == "GPT-4"


def test_champ_only_correct_keeps_graded_correct_traces():
    data = ChampTeacher.with_defaults(model="GPT-4", setting="0-Shot", only_correct=True).load()
    kept = {r.id for r in data.records}
    # GPT-4's 0-shot answer to P_Combinatorics_1 is 771 (gold 239): wrong, so it is dropped
    assert "P_Combinatorics_1" not in kept
    assert 0 < len(kept) < 270
    assert data.skipped["gold answer cannot be graded against (only_correct)"] == 28
    assert data.skipped["teacher answer wrong (only_correct)"] == 268 - 28 - len(kept)


def test_jsonl_teacher_reads_skyt1_traces_and_strips_markers(shared_data):
    teacher = JsonlTeacher.with_defaults(
        path=str(shared_data / "teacher" / "skyt1_14b_amc23_longcot.jsonl"),
        id_field="idx",
        question_field="question",
        answer_field="gt",
        long_cot_field="code.0",
        strip_markers=["<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>"],
    )
    records = teacher.load().records
    assert len(records) == 40
    assert records[0].answer == "27"
    assert all("<|" not in r.long_cot for r in records)
    assert records[0].long_cot.startswith("So I've got this problem here.")


def test_s1k_schema_from_a_local_file(tmp_path):
    rows = [
        {
            "question": "What is 1+1?",
            "solution": "Clearly $1+1=\\boxed{2}$.",
            "deepseek_thinking_trajectory": "Okay, one plus one. That is two.",
            "deepseek_attempt": "\\boxed{2}",
        },
        {
            "question": "Name the answer.",
            "solution": "42",
            "deepseek_thinking_trajectory": "Hmm. It is 42.",
            "deepseek_attempt": "42",
        },
    ]
    path = tmp_path / "s1k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = S1KTeacher.with_defaults(path=str(path)).load().records
    assert [r.answer for r in records] == ["2", "42"]
    assert records[0].long_cot == "Okay, one plus one. That is two."
    assert records[0].short_cot == "Clearly $1+1=\\boxed{2}$."


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "long_cot": "c", "answer": "1"}\n{"question": "q2", "long_cot": \n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: malformed JSON"):
        JsonlTeacher.with_defaults(path=str(path)).load()


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "nofield.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(DataFormatError, match=r"nofield\.jsonl:1: missing field 'long_cot'"):
        JsonlTeacher.with_defaults(path=str(path)).load()
