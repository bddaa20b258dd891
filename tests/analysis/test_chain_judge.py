"""The chain-quality judge: verdict parsing, the two-order combination rule, the report, and a real
run of both orders on the tiny local model (cached and resumable)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from palign.analysis.chain_judge import (
    LOSS,
    TIE,
    WIN,
    ChainJudgePrompt,
    ChainPair,
    build_backend,
    compare_chains,
    judge_pair,
    summarize,
)
from palign.llm.hf_backend import LocalChatBackend
from palign.llm.models import load_tokenizer
from palign.llm.openai_backend import OpenAIChatBackend
from palign.schema import ChainJudge
from tests.conftest import PROJECT_ROOT, compose_config

SHIPPED = OmegaConf.load(PROJECT_ROOT / "conf" / "chain_judge" / "local.yaml")  # the prompt and verdicts shipped
PROMPT = ChainJudgePrompt.from_config(
    OmegaConf.merge(OmegaConf.structured(ChainJudge), {k: v for k, v in SHIPPED.items() if k != "defaults"})
)


@pytest.mark.parametrize(
    "reply_a_first,reply_b_first,outcome,consistent",
    [
        ("A is cleaner. [[A]]", "The second is cleaner. [[B]]", WIN, True),  # A preferred in both orders
        ("[[B]]", "[[A]]", LOSS, True),
        ("[[A]]", "[[A]]", TIE, False),  # always the first-shown chain: pure position bias
        ("[[B]]", "[[B]]", TIE, False),
        ("[[A]]", "equally good [[TIE]]", WIN, False),  # a win and a tie
        ("[[tie]]", "[[A]]", LOSS, False),  # case-insensitive; B wins when shown first
        ("[[TIE]]", "[[TIE]]", TIE, True),
        ("Not [[B]]: my verdict is [[A]]", "[[B]]", WIN, True),  # the last token in a reply counts
        ("[[A]]", "I cannot decide.", WIN, None),  # unparseable scores as a tie
        ("no verdict", "no verdict either", TIE, None),
    ],
)
def test_two_orders_combine_into_one_outcome_for_a(reply_a_first, reply_b_first, outcome, consistent):
    judgment = judge_pair("p", reply_a_first, reply_b_first, PROMPT)
    assert (judgment.outcome, judgment.consistent) == (outcome, consistent)


def test_summary_rates_consistency_and_position_preference():
    replies = [("[[A]]", "[[B]]"), ("[[A]]", "[[B]]"), ("[[A]]", "[[A]]"), ("[[TIE]]", "?"), ("[[B]]", "[[A]]")]
    summary = summarize([judge_pair(str(i), a, b, PROMPT) for i, (a, b) in enumerate(replies)])
    assert summary["pairs"] == 5 and summary["judgments"] == 10
    assert (summary["a_wins"], summary["ties"], summary["a_losses"]) == (2, 2, 1)
    assert summary["a_win_rate"] == 0.4 and summary["tie_rate"] == 0.4 and summary["a_loss_rate"] == 0.2
    assert summary["unparseable"] == 1
    assert summary["position_consistency"] == 3 / 4  # of the 4 pairs with both verdicts parsed
    # decisive verdicts: 8, of which the first-shown chain won 5 (A,A of pair 3 and one of each other pair)
    assert summary["first_position_preference"] == 5 / 8
    assert summarize([])["a_win_rate"] is None


def test_prompt_renders_chains_verbatim_and_validates_its_config():
    rendered = PROMPT.render("Find $x$.", "uses \\frac{1}{2} and {chain_2}", "second")
    assert "uses \\frac{1}{2} and {chain_2}" in rendered  # braces and placeholders inside a chain stay as written
    assert rendered.index("uses \\frac") < rendered.index("second")
    bad = {
        "name": "bad",
        "prompt": "{question} {chain_1}",
        "verdicts": {"first": "[[A]]", "second": "[[B]]", "tie": "[[TIE]]"},
    }
    with pytest.raises(ValueError, match=r"chain judge 'bad'.*\{chain_2\}"):
        ChainJudgePrompt.from_config(bad)
    with pytest.raises(ValueError, match="verdicts"):
        ChainJudgePrompt.from_config(
            {"name": "x", "prompt": "{question}{chain_1}{chain_2} [[A]] [[B]]", "verdicts": {"first": "[[A]]"}}
        )


class CountingBackend:
    """The real local back end, counting what it is asked (not a stand-in for it)."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, []

    def complete(self, user_texts, sampling):
        self.prompts.extend(user_texts)
        return self.inner.complete(user_texts, sampling)

    def identity(self):
        return self.inner.identity()


PAIRS = [
    ChainPair(
        "p1",
        "What is 2+3?",
        "<Begin_of_Prefix>2+3<End_of_Prefix>\nSo the answer is 5.",
        "Let me think. 2+3... wait, 5. Check: 5.",
    ),
    ChainPair(
        "p2", "Is 7 prime?", "7 has no divisor but 1 and 7, so yes.", "Hmm, 7/2 no, 7/3 no, maybe prime? Yes, prime."
    ),
    ChainPair("p3", "Compute 3*4.", "3*4 = 12.", "3*4 is 12, double-checking: 4+4+4 = 12."),
]


def test_local_judge_judges_every_pair_in_both_orders_and_caches(tiny_model, student_specs, cache_dir, tmp_path):
    tokenizer = load_tokenizer(student_specs["tiny_random"], cache_dir)
    sampling = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.0, "batch_size": 6}
    backend = CountingBackend(LocalChatBackend(lambda: tiny_model, tokenizer, identity={"name": "tiny_random"}))
    result = compare_chains(backend, PAIRS, PROMPT, sampling, cache_dir=tmp_path)

    assert len(backend.prompts) == 6  # every pair judged twice
    for pair in PAIRS:
        a_first, b_first = [p for p in backend.prompts if pair.chain_a in p]
        assert a_first.index(pair.chain_a) < a_first.index(pair.chain_b)
        assert b_first.index(pair.chain_b) < b_first.index(pair.chain_a)
    summary = result.summary
    assert summary["pairs"] == 3 and summary["judgments"] == 6
    assert summary["a_wins"] + summary["ties"] + summary["a_losses"] == 3
    assert len(result.judgments) == 3 and all(
        j.reply_a_first is not None and j.reply_b_first is not None for j in result.judgments
    )
    assert [r["id"] for r in result.records] == ["p1", "p2", "p3"]
    json.dumps(result.records)  # the per-pair records are plain JSON

    again = CountingBackend(backend.inner)
    cached = compare_chains(again, PAIRS, PROMPT, sampling, cache_dir=tmp_path)
    assert again.prompts == []  # every judgment came from the artifact
    assert cached.records == result.records and cached.artifact == result.artifact

    changed = [PAIRS[0], ChainPair("p2", PAIRS[1].question, "A different chain.", PAIRS[1].chain_b), PAIRS[2]]
    compare_chains(again, changed, PROMPT, sampling, cache_dir=tmp_path)
    assert len(again.prompts) == 2  # only the pair whose text changed is judged again


def test_duplicate_pair_ids_are_rejected():
    with pytest.raises(ValueError, match="duplicate pair id 'p1'"):
        compare_chains(None, [PAIRS[0], PAIRS[0]], PROMPT, {"num_samples": 1})


def test_build_backend_from_configs_never_sees_the_key(tmp_path, monkeypatch, cache_dir):
    secret = "sk-never-in-config-5555"
    monkeypatch.setenv("ZHIPUAI_API_KEY", secret)
    from hydra.utils import instantiate

    cfg = compose_config(
        [
            "chain_judge=openai",
            "chain_judge.backend.model=glm-4.5",
            "chain_judge.backend.api_key_env=ZHIPUAI_API_KEY",
            "student=tiny_random",
        ],
        tmp_path,
    )
    judge = build_backend(instantiate(cfg.chain_judge.backend), cfg.chain_judge.model, cache_dir)
    assert isinstance(judge, OpenAIChatBackend) and judge.model == "glm-4.5" and judge.api_key_env == "ZHIPUAI_API_KEY"
    assert judge.url == "http://127.0.0.1:8000/v1/chat/completions"
    for text in (OmegaConf.to_yaml(cfg, resolve=True), repr(judge), str(vars(judge)), json.dumps(judge.identity())):
        assert secret not in text
    local = compose_config(["chain_judge=local", "student=tiny_random"], tmp_path)
    assert isinstance(
        build_backend(instantiate(local.chain_judge.backend), local.chain_judge.model, cache_dir), LocalChatBackend
    )


@pytest.mark.slow
def test_judge_chains_stage_compares_the_run_targets_and_reports_them(tmp_path):
    import json

    from palign.pipeline import run
    from tests.conftest import compose_config

    summary = run(
        compose_config(
            [
                "experiment=tiny",
                "logger=none",
                "baseline=palign",
                "stage=judge_chains",
                "chain_judge.limit=2",
                "chain_judge.sampling.max_new_tokens=8",
            ],
            tmp_path,
        )
    )
    (stats,) = summary["chain_judge"]["prefix_continuation_vs_long_cot"].values()
    assert (
        stats["problems"] == 2 and stats["pairs"] + stats["skipped"] == 2 and stats["judgments"] == 2 * stats["pairs"]
    )
    with open(stats["records"]) as records:
        rows = [json.loads(line) for line in records]
    assert len(rows) == stats["pairs"] and all({"reply_a_first", "reply_b_first", "outcome"} <= set(r) for r in rows)
    assert stats["unparseable"] == sum((r["a_first"] is None) + (r["b_first"] is None) for r in rows)  # a random judge
    assert "truncation" in summary and "alignment" in summary  # stages 1 and 2 ran and reported
