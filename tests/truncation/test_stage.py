"""Stage 1 over a data set: the artifact, its cache, resume after a crash, thresholds, fixed ratio."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from palign.llm.models import ModelSpec
from palign.schema import ConfigError, Judge, JudgePrompt, check_values, defaults
from palign.teachers.records import TeacherRecord
from palign.truncation.judge import (
    AbsoluteThreshold,
    QuantileThreshold,
    RelativeToFullThreshold,
    SufficiencyJudge,
    render_prompt,
)
from palign.truncation.prefixes import AdaptivePrefix, FixedRatioPrefix
from palign.truncation.search import BinaryPrefixSearch, ExhaustivePrefixSearch
from palign.truncation.stage import PrefixTruncation, truncation_stats
from palign.truncation.units import Sentences, split_sentences
from tests.conftest import PROJECT_ROOT, compose_config

PROMPT = JudgePrompt(**OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/truncation/judge_prompt/paper.yaml")))
TINY = ModelSpec.from_config(OmegaConf.load(PROJECT_ROOT / "conf/student/tiny_random.yaml"))


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
    made = []

    def factory(crash_after=None):
        judge = CountingJudge.hf(tiny_model, smollm2_tokenizer, PROMPT, batch_size=4)
        judge.crash_after = crash_after
        made.append(judge)
        return judge

    factory.made = made
    return factory


ADAPTIVE = AdaptivePrefix()  # stateless: one serves every call


def truncation(
    cache, tokenizer, judge_factory=None, *, prefix=ADAPTIVE, search=BinaryPrefixSearch, **judge
) -> PrefixTruncation:
    """Stage 1 as `make_truncation` builds it from typed nodes: sentences, 2 traces per chunk, `search`,
    the tiny model's judge node (batch 4, 8 reply tokens, threshold absolute 0; the schema's defaults
    otherwise) but `judge`, and the paper's prompt."""
    node = Judge(
        **{
            **defaults(Judge),
            "model": TINY,
            "batch_size": 4,
            "max_new_tokens": 8,
            "threshold": AbsoluteThreshold(value=0.0),
            **judge,
        }
    )
    return PrefixTruncation(
        prefix,
        Sentences(),
        cache,
        tokenizer,
        chunk_size=2,
        search=search,
        judge=node,
        judge_prompt=PROMPT,
        judge_factory=judge_factory,
        progress=False,
    )


def test_artifact_records_every_probe_and_reruns_hit_the_cache(tmp_path, smollm2_tokenizer, make_judge):
    stage = truncation(tmp_path, smollm2_tokenizer, lambda: make_judge())
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
    again = truncation(tmp_path, smollm2_tokenizer, lambda: pytest.fail("judge built on a cache hit"))
    assert again.run(records()) == rows and again.judge_calls == 0
    # a different threshold is a different artifact
    other = truncation(tmp_path, smollm2_tokenizer, lambda: make_judge(), threshold=AbsoluteThreshold(value=1.0))
    assert other.folder != stage.folder


def test_interrupted_run_resumes_without_redoing_or_duplicating(tmp_path, smollm2_tokenizer, make_judge):
    full = truncation(tmp_path / "reference", smollm2_tokenizer, lambda: make_judge()).run(records())
    crashing = truncation(tmp_path, smollm2_tokenizer, lambda: make_judge(crash_after=12))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run(records())
    lines = (crashing.folder / "records.jsonl").read_text().splitlines()
    done = {json.loads(line)["id"] for line in lines}
    assert 0 < len(done) < 6  # whole chunks were saved before the crash
    resumed = truncation(tmp_path, smollm2_tokenizer, lambda: make_judge())
    rows = resumed.run(records())
    expected_calls = sum(len(r["probes"]) for r in full if r["id"] not in done)
    assert resumed.judge_calls == expected_calls  # only the unfinished examples were judged
    ids = [json.loads(line)["id"] for line in (resumed.folder / "records.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) == [f"p{i}" for i in range(6)]
    assert [r["chosen_k"] for r in rows] == [r["chosen_k"] for r in full]


def test_fixed_ratio_keeps_ceil_lambda_m_units_without_a_judge(tmp_path, smollm2_tokenizer):
    stage = PrefixTruncation(
        FixedRatioPrefix(ratio=0.5), Sentences(), tmp_path, smollm2_tokenizer, chunk_size=2, progress=False
    )  # no search, judge or prompt: the policy reads none
    rows = stage.run(records())
    for row in rows:
        assert row["chosen_k"] == max(1, math.ceil(0.5 * row["m"]))
        assert row["probes"] == [] and row["judge_calls"] == 0
    assert stage.judge_calls == 0


def test_relative_and_quantile_thresholds(tmp_path, smollm2_tokenizer, make_judge):
    relative = truncation(
        tmp_path,
        smollm2_tokenizer,
        lambda: make_judge(),
        search=ExhaustivePrefixSearch,
        threshold=RelativeToFullThreshold(value=0.0),
    )
    for row in relative.run(records()):
        assert row["threshold"] == pytest.approx(row["full_score"])
        # exhaustive judged k = m too, which scores exactly the full trace: never a fallback
        assert not row["fallback"]
        assert [p["sufficient"] for p in row["probes"]] == [
            p["score"] >= row["threshold"] - 1e-4 for p in row["probes"]
        ]
    quantile = truncation(
        tmp_path,
        smollm2_tokenizer,
        lambda: make_judge(),
        threshold=QuantileThreshold(value=0.5, calibration_examples=3),
    )
    rows = quantile.run(records())
    calibration = json.loads((quantile.folder / "calibration.json").read_text())
    assert calibration["examples"] == 3 and len(calibration["scores"]) == sum(r["m"] for r in rows[:3])
    assert all(r["threshold"] == calibration["threshold"] for r in rows)


def test_stats_summarise_ratios_fallbacks_and_tokens():
    rows = [
        {
            "prefix_ratio": 0.25,
            "fallback": False,
            "judge_calls": 6,
            "m": 48,
            "prefix_tokens": 100,
            "full_tokens": 400,
            "monotone": True,
            "probes": [{"score": 1.0}, {"score": -1.0}],
        },
        {
            "prefix_ratio": 1.0,
            "fallback": True,
            "judge_calls": 4,
            "m": 10,
            "prefix_tokens": 100,
            "full_tokens": 100,
            "monotone": False,
            "probes": [{"score": 0.5}],
        },
    ]
    stats = truncation_stats(rows)
    assert stats["prefix_ratio_mean"] == 0.625 and stats["fallback_rate"] == 0.5
    assert stats["judge_calls_per_example"] == 5 and stats["tokens_saved_fraction"] == pytest.approx(0.6)
    assert stats["monotone_rate"] == 0.5 and stats["score_median"] == 0.5


class LengthRecordingJudge(SufficiencyJudge):
    """The real judge, remembering the length of every sequence it sends its model (prompt tokens; the
    one-pass engine's longest forward) and the questions whose prefixes it scored."""

    def prefix_scores(self, items):
        self.questions = getattr(self, "questions", []) + [question for question, _, ks in items if ks]
        return super().prefix_scores(items)

    def _one_pass(self, head, pieces, tail, ks):
        if ks:
            self.sent = [*getattr(self, "sent", []), len(head) + sum(len(p) for p in pieces[: max(ks)]) + len(tail)]
        return super()._one_pass(head, pieces, tail, ks)

    def score_encoded(self, encoded):
        self.sent = getattr(self, "sent", []) + [len(ids) for ids in encoded]
        return super().score_encoded(encoded)

    def generate_replies(self, pairs):
        from palign.llm.chat import encode_user_turn

        self.sent = getattr(self, "sent", []) + [
            len(encode_user_turn(self.tokenizer, render_prompt(self.prompt, q, r), self.chat_template_kwargs))
            + self.max_new_tokens
            for q, r in pairs
        ]
        return super().generate_replies(pairs)


@pytest.mark.parametrize("mode,engine", [("logits", "one_pass"), ("logits", "batched"), ("generate", "batched")])
def test_a_trace_longer_than_the_judges_context_is_searched_and_no_probe_exceeds_it(
    mode, engine, tmp_path, smollm2_tokenizer, tiny_model
):
    prompt = PROMPT
    long_steps = " ".join(f"Step {j}: we add {j} and find {j + 7}." for j in range(60))
    long = TeacherRecord(id="long", question="What is 7 + 7?", answer="14", long_cot=long_steps)
    data = [*records(4), long]
    judges = []

    def factory(context):
        def make():
            judges.append(
                LengthRecordingJudge.hf(
                    tiny_model,
                    smollm2_tokenizer,
                    prompt,
                    batch_size=4,
                    mode=mode,
                    engine=engine,
                    max_new_tokens=4,
                    max_context_tokens=context,
                )
            )
            return judges[-1]

        return make

    # a context that holds every short trace whole but not the long one
    probe = factory(None)()
    fits = {r.id: probe.longest_fitting_prefix(r.question, _segments(r)) for r in data}
    assert probe.context_tokens == tiny_model.config.max_position_embeddings  # null: the model's own context
    assert all(fits[r.id] == _segments(r).m for r in data)  # the model's 4096 positions hold them all
    full = {r.id: _probe_tokens(probe, r, _segments(r).m) for r in data}
    context = max(full[r.id] for r in data[:4]) + probe.reply_tokens
    assert full["long"] + probe.reply_tokens > context

    stage = truncation(tmp_path, smollm2_tokenizer, factory(context), mode=mode, max_context_tokens=context)
    rows = {row["id"]: row for row in stage.run(data)}
    (judge,) = judges[1:]
    assert set(rows) == {r.id for r in data}  # nothing leaves the training set for its length
    assert max(judge.sent) + (probe.reply_tokens if mode == "logits" else 0) <= context  # no request over the context
    longest = rows["long"]
    assert 0 < longest["fitting_k"] < longest["m"]
    over = [p for p in longest["probes"] if p["over_context"]]
    assert over and all(
        p["k"] > longest["fitting_k"] and not p["sufficient"] and p["score"] is None and p["reply"] is None
        for p in over
    )
    assert all(p["k"] <= longest["fitting_k"] for p in longest["probes"] if not p["over_context"])
    assert longest["probes"][0]["k"] == (longest["m"] + 1) // 2  # the authors' first probe: half the trace
    assert longest["probes_over_context"] == len(over)
    assert all(r["probes_over_context"] == 0 and r["fitting_k"] == r["m"] for i, r in rows.items() if i != "long")
    stats = stage.stats
    assert stats["probes_over_context"] == len(over) and stats["examples_over_context"] == 1
    # the judge was called for the probes that fit only
    assert stage.judge_calls == sum(len(r["probes"]) - r["probes_over_context"] for r in rows.values())
    # the context decides verdicts: another context is another store
    assert truncation(tmp_path, smollm2_tokenizer, mode=mode, max_context_tokens=context + 1).folder != stage.folder


def _segments(record):
    return split_sentences(record.long_cot)


def _probe_tokens(judge, record, k):
    """The prompt tokens of prefix k's probe, as the judge's mode sends it."""
    if judge.mode == "logits":
        head, pieces, tail = judge.prefix_tokens(record.question, _segments(record))
        return len(head) + sum(len(p) for p in pieces[:k]) + len(tail)
    from palign.llm.chat import encode_user_turn

    text = render_prompt(judge.prompt, record.question, _segments(record).prefix(k))
    return len(encode_user_turn(judge.tokenizer, text, judge.chat_template_kwargs))


def test_a_context_too_small_for_any_prompt_is_refused(tiny_model, smollm2_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="leaves no room for a prompt before the 8-token reply"):
        SufficiencyJudge.hf(
            tiny_model, smollm2_tokenizer, PROMPT, mode="generate", max_new_tokens=8, max_context_tokens=8
        )
    with pytest.raises(
        ConfigError, match=r"truncation\.judge\.max_context_tokens=0: must be null .* or an integer >= 2"
    ):
        check_values(compose_config(["truncation.judge.max_context_tokens=0"], tmp_path))


# The folders (store names) these configs' stage-1 stores had when thresholds, searches, granularities
# and the fixed ratio were names and options rebuilt into TruncationSettings (palign at 72d8dca): the
# same computation keeps its store, so no cached truncation is recomputed after the change to typed nodes.
STORE_FOLDERS = {
    "binary-sentence-8bda3c9d2eb99bd2": [],  # the CPU demo: relative_to_full 0.3, answer_reachable
    "binary-paper_sentence-225e52bdc857d89c": ["experiment=paper/table1_qwen2_5_7b"],  # generate mode
    "fixed_ratio-sentence-99b3f5f00805a15f": ["baseline=fixed_ratio", "baseline.prefix.ratio=0.25"],
    "fixed_ratio-sentence-a1ac358a678baabb": ["baseline=fixed_ratio"],
    "linear-token_chunk-621eeffd1a0bb185": [
        "truncation/granularity=token_chunk",
        "truncation/search=linear",
        "truncation/judge=self",
    ],  # absolute 0, chunk_tokens 64
    "exhaustive-sentence-5c27817cac440f31": [
        "truncation/search=exhaustive",
        "truncation/judge=self_generate",
        "truncation.judge.max_context_tokens=2048",
    ],
    "binary-sentence-c416370623cdbcf7": [
        "truncation/judge/threshold=quantile",
        "truncation.judge.threshold.value=0.7",
        "truncation.judge.threshold.calibration_examples=4",
    ],
    "binary-step-4d096a71d59e62df": [
        "truncation/judge=smollm2_135m",
        "truncation/judge_prompt=paper",
        "truncation/granularity=step",
    ],
    "binary-sentence-73b6b91eec79d66b": ["experiment=tiny", "baseline=prefix_only"],
}


@pytest.mark.parametrize("folder", sorted(STORE_FOLDERS))
def test_a_config_keeps_the_store_folder_it_had_before_typed_nodes(folder, tmp_path):
    from pathlib import Path

    from palign.pipeline import RunContext, make_truncation

    cfg = compose_config(STORE_FOLDERS[folder], tmp_path)
    stage = make_truncation(
        RunContext(cfg=cfg, run_id="x", run_dir=tmp_path, cache_dir=Path(cfg.paths.cache_dir)), None
    )
    assert stage.folder.name == folder
