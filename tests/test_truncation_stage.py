"""Stage 1 over a data set: the artifact, its cache, resume after a crash, thresholds, fixed ratio."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from conftest import PROJECT_ROOT
from palign.teachers.records import TeacherRecord
from palign.truncation.judge import JudgePrompt, SufficiencyJudge
from palign.truncation.stage import PrefixTruncation, TruncationSettings, truncation_stats


def records(n: int = 6) -> list[TeacherRecord]:
    out = []
    for i in range(n):
        steps = [f"Step {j} of problem {i}: we compute {j} + {i} = {i + j}." for j in range(1, 4 + i)]
        out.append(TeacherRecord(id=f"p{i}", question=f"What is {i} + 3?", answer=str(i + 3), long_cot=" ".join(steps)))
    return out


class CountingJudge(SufficiencyJudge):
    """The real judge, counting the prefixes it scores and optionally crashing after a budget."""

    crash_after: int | None = None

    def prefix_scores(self, items):
        if self.crash_after is not None and self.calls + sum(len(ks) for _, _, ks in items) > self.crash_after:
            raise RuntimeError("simulated crash")
        return super().prefix_scores(items)


@pytest.fixture()
def make_judge(tiny_model, smollm2_tokenizer):
    prompt = JudgePrompt.from_config(OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/truncation/judge_prompt/paper.yaml")))
    made = []

    def factory(crash_after=None):
        judge = CountingJudge.hf(tiny_model, smollm2_tokenizer, prompt, batch_size=4)
        judge.crash_after = crash_after
        made.append(judge)
        return judge

    factory.made = made
    return factory


def settings(**kw) -> TruncationSettings:
    base = dict(granularity="sentence", granularity_options={}, search="binary", ratio=None, judge_identity={"name": "tiny_random"},
                judge_prompt={"name": "paper"}, mode="logits", threshold={"kind": "absolute", "value": 0.0}, max_new_tokens=8,
                batch_size=4, chunk_size=2, max_trace_tokens=None)
    return TruncationSettings(**{**base, **kw})


def test_artifact_records_every_probe_and_reruns_hit_the_cache(tmp_path, smollm2_tokenizer, make_judge):
    stage = PrefixTruncation(settings(), tmp_path, smollm2_tokenizer, lambda: make_judge(), progress=False)
    rows = stage.run(records())
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(6)]
    for row in rows:
        assert row["m"] == len(row["units"]) and 1 <= row["chosen_k"] <= row["m"]
        assert row["prefix"] == "".join(row["units"][: row["chosen_k"]]).rstrip()
        assert row["prefix_ratio"] == row["chosen_k"] / row["m"]
        assert 0 < row["prefix_tokens"] <= row["full_tokens"]
        assert row["probes"] and all(isinstance(p["score"], float) for p in row["probes"])
        sufficient = [p["k"] for p in row["probes"] if p["sufficient"]]
        assert row["chosen_k"] == (min(sufficient) if sufficient else row["m"])
        assert row["fallback"] == (not sufficient)
    assert stage.judge_calls == sum(len(r["probes"]) for r in rows)
    # the one-pass engine scored every prefix of each trace, the search consulted a few of them
    assert all(r["prefixes_scored"] == r["m"] for r in rows)
    # the same settings again: no judge is even built, and the artifact is identical
    again = PrefixTruncation(settings(), tmp_path, smollm2_tokenizer, lambda: pytest.fail("judge built on a cache hit"), progress=False)
    assert again.run(records()) == rows and again.judge_calls == 0
    # a different threshold is a different artifact
    other = PrefixTruncation(settings(threshold={"kind": "absolute", "value": 1.0}), tmp_path, smollm2_tokenizer, lambda: make_judge(), progress=False)
    assert other.folder != stage.folder


def test_interrupted_run_resumes_without_redoing_or_duplicating(tmp_path, smollm2_tokenizer, make_judge):
    full = PrefixTruncation(settings(), tmp_path / "reference", smollm2_tokenizer, lambda: make_judge(), progress=False).run(records())
    crashing = PrefixTruncation(settings(), tmp_path, smollm2_tokenizer, lambda: make_judge(crash_after=12), progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run(records())
    lines = (crashing.folder / "records.jsonl").read_text().splitlines()
    done = {json.loads(line)["id"] for line in lines}
    assert 0 < len(done) < 6  # whole chunks were saved before the crash
    resumed = PrefixTruncation(settings(), tmp_path, smollm2_tokenizer, lambda: make_judge(), progress=False)
    rows = resumed.run(records())
    expected_calls = sum(len(r["probes"]) for r in full if r["id"] not in done)
    assert resumed.judge_calls == expected_calls  # only the unfinished examples were judged
    ids = [json.loads(line)["id"] for line in (resumed.folder / "records.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) == [f"p{i}" for i in range(6)]
    assert [r["chosen_k"] for r in rows] == [r["chosen_k"] for r in full]


def test_fixed_ratio_keeps_ceil_lambda_m_units_without_a_judge(tmp_path, smollm2_tokenizer):
    stage = PrefixTruncation(settings(search="fixed_ratio", ratio=0.5), tmp_path, smollm2_tokenizer, None, progress=False)
    rows = stage.run(records())
    for row in rows:
        assert row["chosen_k"] == max(1, math.ceil(0.5 * row["m"]))
        assert row["probes"] == [] and row["judge_calls"] == 0
    assert stage.judge_calls == 0


def test_relative_and_quantile_thresholds(tmp_path, smollm2_tokenizer, make_judge):
    relative = PrefixTruncation(settings(threshold={"kind": "relative_to_full", "value": 0.0}, search="exhaustive"),
                                tmp_path, smollm2_tokenizer, lambda: make_judge(), progress=False)
    for row in relative.run(records()):
        assert row["threshold"] == pytest.approx(row["full_score"])
        # exhaustive judged k = m too, which scores exactly the full trace: never a fallback
        assert not row["fallback"]
        assert [p["sufficient"] for p in row["probes"]] == [p["score"] >= row["threshold"] - 1e-4 for p in row["probes"]]
    quantile = PrefixTruncation(settings(threshold={"kind": "quantile", "value": 0.5, "calibration_examples": 3}),
                                tmp_path, smollm2_tokenizer, lambda: make_judge(), progress=False)
    rows = quantile.run(records())
    calibration = json.loads((quantile.folder / "calibration.json").read_text())
    assert calibration["examples"] == 3 and len(calibration["scores"]) == sum(r["m"] for r in rows[:3])
    assert all(r["threshold"] == calibration["threshold"] for r in rows)


def test_stats_summarise_ratios_fallbacks_and_tokens():
    rows = [
        {"prefix_ratio": 0.25, "fallback": False, "judge_calls": 6, "m": 48, "prefix_tokens": 100, "full_tokens": 400,
         "monotone": True, "probes": [{"score": 1.0}, {"score": -1.0}]},
        {"prefix_ratio": 1.0, "fallback": True, "judge_calls": 4, "m": 10, "prefix_tokens": 100, "full_tokens": 100,
         "monotone": False, "probes": [{"score": 0.5}]},
    ]
    stats = truncation_stats(rows)
    assert stats["prefix_ratio_mean"] == 0.625 and stats["fallback_rate"] == 0.5
    assert stats["judge_calls_per_example"] == 5 and stats["tokens_saved_fraction"] == pytest.approx(0.6)
    assert stats["monotone_rate"] == 0.5 and stats["score_median"] == 0.5


class RecordingJudge(SufficiencyJudge):
    """The real judge, remembering every question whose prefixes it scored."""

    def prefix_scores(self, items):
        self.questions = getattr(self, "questions", []) + [question for question, _, _ in items]
        return super().prefix_scores(items)


def test_traces_over_the_cap_get_no_prefix_are_counted_and_never_judged(tmp_path, smollm2_tokenizer, tiny_model, caplog):
    prompt = JudgePrompt.from_config(OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/truncation/judge_prompt/paper.yaml")))
    judges = []

    def factory():
        judges.append(RecordingJudge.hf(tiny_model, smollm2_tokenizer, prompt, batch_size=4))
        return judges[-1]

    long_steps = " ".join(f"Step {j}: we add {j} and find {j + 7}." for j in range(60))
    long = TeacherRecord(id="long", question="What is 7 + 7?", answer="14", long_cot=long_steps)
    data = [*records(4), long]
    tokens = {r.id: len(smollm2_tokenizer(r.long_cot, add_special_tokens=False)["input_ids"]) for r in data}
    cap = max(tokens[r.id] for r in data[:4])
    assert tokens["long"] > cap  # the other traces fit exactly, at worst

    capped = PrefixTruncation(settings(max_trace_tokens=cap), tmp_path, smollm2_tokenizer, factory, progress=False)
    with caplog.at_level("INFO", logger="palign.truncation.stage"):
        rows = capped.run(data)
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3"]
    assert capped.stats["skipped_too_long"] == 1 and capped.stats["skipped_no_units"] == 0 and capped.stats["examples"] == 4
    (judge,) = judges
    assert "What is 7 + 7?" not in judge.questions  # never read by the judge
    assert capped.judge_calls == sum(len(r["probes"]) for r in rows) > 0
    # progress: one line per chunk of 2 traces, and the skipped trace named with its length
    assert [m for m in caplog.messages if "traces (" in m][-1].startswith("truncation: 4/4 traces (100%)")
    assert any(f"long ({tokens['long']})" in m and "max_trace_tokens" in m for m in caplog.messages)
    assert capped(data) == {r["id"]: r["prefix"] for r in rows} and capped.skipped_too_long == 1  # not counted twice

    # the cap selects examples but changes no record: one store, and raising the cap judges only the newcomer
    uncapped = PrefixTruncation(settings(max_trace_tokens=None), tmp_path, smollm2_tokenizer, factory, progress=False)
    assert uncapped.folder == capped.folder
    everything = uncapped.run(data)
    assert everything[:4] == rows and everything[4]["id"] == "long"
    assert set(judges[1].questions) == {"What is 7 + 7?"}
    assert uncapped.judge_calls == len(everything[4]["probes"]) and uncapped.stats["skipped_too_long"] == 0
    # and the cap applies to stored records too: lowering it again drops the long one without a judge
    again = PrefixTruncation(settings(max_trace_tokens=cap), tmp_path, smollm2_tokenizer,
                             lambda: pytest.fail("judge built although nothing is missing"), progress=False)
    assert again.run(data) == rows and again.skipped_too_long == 1
    with pytest.raises(ValueError, match="judge.max_trace_tokens must be a positive"):
        settings(max_trace_tokens=0)
