"""Stage 2: continuation prompt, the correctness filter, the P-ALIGN target, teacher generation."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from palign.alignment.continuation import AlignmentSettings, PrefixContinuation, continuation_prompt
from palign.data.supervision import build_targets
from palign.llm.hf_backend import HFBackend
from palign.llm.models import load_model
from palign.teachers.records import TeacherRecord
from palign.teachers.sources import GeneratedTeacher
from tests.conftest import PROJECT_ROOT, stage_cache

PROMPTS = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "prompts" / "paper.yaml"))


def test_continuation_prompt_is_the_authors_verbatim():
    text = continuation_prompt(PROMPTS, "Find $x$ if $x^{2}=4$.", "We take square roots.")
    assert text == (
        "Please continue from the draft and solve the problem step by step, and put your final answer within "
        "\\boxed{}. I will provide you with some prior knowledge as a draft to assist you in solving the "
        "question.*Question*:Find $x$ if $x^{2}=4$.\n*Prefix*:We take square roots."
    )


def test_palign_target_wraps_the_prefix_in_markers():
    record = TeacherRecord(id="a", question="q", answer="1", long_cot="long")
    examples, skipped = build_targets(
        [record], "prefix_continuation", {"a": "Teacher part."}, {"a": "So \\boxed{1}."}, PROMPTS["prefix_markers"]
    )
    assert examples[0].target == "<Begin_of_Prefix>Teacher part.<End_of_Prefix>\nSo \\boxed{1}."
    only_prefix, _ = build_targets([record], "prefix_only", {"a": "Teacher part."})
    assert only_prefix[0].target == "Teacher part."
    # an example whose continuation was filtered out has no target and is counted
    dropped, skipped = build_targets(
        [record], "prefix_continuation", {"a": "Teacher part."}, {}, PROMPTS["prefix_markers"]
    )
    assert dropped == [] and skipped == {"continuation missing or wrong": 1}


def settings(**kw) -> AlignmentSettings:
    base = dict(
        model_identity={"name": "tiny_random"},
        prompts=PROMPTS,
        sampling={"max_new_tokens": 6, "do_sample": True, "num_samples": 1, "batch_size": 4, "seed": 0},
        filter="correct",
        chunk_size=2,
        grading_workers=1,
        grading_timeout_s=10.0,
        chat_template_kwargs={},
    )
    return AlignmentSettings(**{**base, **kw})


RECORDS = [
    TeacherRecord(id=f"p{i}", question=f"What is {i} + 1?", answer=str(i + 1), long_cot=f"{i} plus one")
    for i in range(3)
]
PREFIXES = {r.id: f"We add one to {i}." for i, r in enumerate(RECORDS)}


def test_filter_keeps_graded_correct_continuations_only(tmp_path, smollm2_tokenizer, student_specs, cache_dir):
    stage = PrefixContinuation(
        settings(),
        tmp_path,
        lambda: load_model(student_specs["tiny_random"], cache_dir),
        smollm2_tokenizer,
        progress=False,
    )
    rows = stage.run(RECORDS, PREFIXES)
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"] and stage.generated == 3
    assert all(r["prefix"] == PREFIXES[r["id"]] and r["tokens"] <= 6 for r in rows)
    # rewrite the stored continuations with known answers, as if the student had written them
    store = stage.folder / "records.jsonl"
    lines = [json.loads(line) for line in store.read_text().splitlines()]
    texts = {"p0": "Adding gives \\boxed{1}.", "p1": "So the answer is \\boxed{5}.", "p2": "It is $\\boxed{3}$."}
    truth = {"p0": True, "p1": False, "p2": True}
    for row in lines:
        row.update(continuation=texts[row["id"]], correct=truth[row["id"]])
    store.write_text("".join(json.dumps(row) + "\n" for row in lines))
    rerun = PrefixContinuation(
        settings(),
        tmp_path,
        lambda: pytest.fail("model loaded although all are stored"),
        smollm2_tokenizer,
        progress=False,
    )
    kept = rerun(RECORDS, PREFIXES)
    assert kept == {"p0": texts["p0"], "p2": texts["p2"]}
    assert rerun.stats["retention"] == pytest.approx(2 / 3) and rerun.generated == 0
    keep_all = PrefixContinuation(settings(filter="none"), tmp_path, lambda: None, smollm2_tokenizer, progress=False)
    assert keep_all.folder == rerun.folder  # the filter is applied on read: same stored continuations
    assert set(keep_all(RECORDS, PREFIXES)) == {"p0", "p1", "p2"}
    # a gold answer fixed since (p1's is 5 now, p0's 7) is graded against again, nothing is generated again
    fixed = [
        TeacherRecord(
            id=r.id, question=r.question, answer={"p0": "7", "p1": "5"}.get(r.id, r.answer), long_cot=r.long_cot
        )
        for r in RECORDS
    ]
    regraded = PrefixContinuation(
        settings(),
        tmp_path,
        lambda: pytest.fail("model loaded for a new gold answer"),
        smollm2_tokenizer,
        progress=False,
    )
    assert regraded(fixed, PREFIXES) == {"p1": texts["p1"], "p2": texts["p2"]} and regraded.generated == 0
    assert {r["id"]: r["answer"] for r in regraded.rows_seen.values()} == {"p0": "7", "p1": "5", "p2": "3"}
    assert [json.loads(line)["answer"] for line in store.read_text().splitlines()] == [
        "1",
        "2",
        "3",
    ]  # the store as it was


def test_the_grader_decides_correctness_of_generated_text(tmp_path, smollm2_tokenizer, student_specs, cache_dir):
    """Real generations of the random tiny model are graded by math-verify: none is right."""
    stage = PrefixContinuation(
        settings(),
        tmp_path,
        lambda: load_model(student_specs["tiny_random"], cache_dir),
        smollm2_tokenizer,
        progress=False,
    )
    assert stage(RECORDS, PREFIXES) == {}
    assert all(r["correct"] is False for r in stage.rows_seen.values())
    # without prefixes (student_only) the plain instruction prompt is used, stored under other keys
    stage(RECORDS, None)
    assert len(stage.rows_seen) == 6 and sum(r["prefix"] is None for r in stage.rows_seen.values()) == 3


def test_teacher_generation_keeps_correct_traces_and_is_cached(tmp_path, student_specs, shared_data):
    cache = stage_cache(tmp_path)  # the converted models, and nothing generated before

    def teacher(**kw):
        return GeneratedTeacher.with_defaults(
            model=student_specs["tiny_random"],
            problems={"kind": "file", "path": str(shared_data / "problems" / "math_train.json")},
            sampling={"max_new_tokens": 6, "do_sample": True, "num_samples": 1, "batch_size": 3, "seed": 1},
            cache_dir=str(cache),
            prompts=PROMPTS,
            problem_limit=3,
            backend=HFBackend(),
            **kw,
        )

    data = teacher(only_correct=False).load()
    assert len(data.records) == 3 and data.records[0].question.startswith("Let \\[f(x) = \\left\\{")
    assert data.records[0].answer == "0" and all(r.long_cot for r in data.records)
    strict = teacher().load()  # a random model is never right: every trace is dropped and counted
    assert strict.records == [] and strict.skipped["teacher answer wrong (only_correct)"] == 3
    (store,) = list((cache / "teacher_generation").glob("*/records.jsonl"))
    assert len(store.read_text().splitlines()) == 3  # generated once, reused by the second load
