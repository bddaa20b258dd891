"""Minimal-sufficient-prefix search (palign/truncation/search.py, PAPER.md §2.1 items 3-4, §6)."""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import pytest
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from palign.truncation.search import (
    BinaryPrefixSearch,
    PrefixSearch,
    SearchResult,
    Verdict,
    fixed_ratio_k,
    run_searches,
)
from tests.conftest import PROJECT_ROOT

# each option of conf/truncation/search/ built as the stage builds it: a factory of one search per trace
SEARCHES = {
    path.stem: instantiate(OmegaConf.load(path)) for path in (PROJECT_ROOT / "conf/truncation/search").glob("*.yaml")
}
STRATEGIES = sorted(SEARCHES)


def create_search(strategy: str, m: int) -> PrefixSearch:
    return SEARCHES[strategy](m)


def test_each_search_option_builds_the_search_it_is_named_after() -> None:
    assert STRATEGIES == ["binary", "exhaustive", "linear"]
    for name, factory in SEARCHES.items():
        made = factory(7)
        assert isinstance(made, PrefixSearch) and made.strategy == name and made.m == 7
        assert factory(3) is not made  # a fresh state per trace


def test_every_search_class_has_a_name_of_its_own() -> None:
    # the name, with the options, names a search's stores (palign/truncation/prefixes.py: search_identity): two
    # classes of one name would share stores, and a new search with a name of its own never meets an old store
    classes = PrefixSearch.__subclasses__()
    assert len(classes) >= 3 and len({c.strategy for c in classes}) == len(classes)


def search_alone(strategy: str, m: int, sufficient: Callable[[int], bool]) -> SearchResult:
    """Run one search to the end, judging each pending k with `sufficient(k)`."""
    state = create_search(strategy, m)
    while not state.done:
        for k in state.pending():
            state.observe(k, sufficient(k), score=float(k), reply=f"judged {k}")
    return state.result()


class RecordingJudge:
    """A scripted judge: example i is sufficient iff k >= thresholds[i]; records every batch."""

    def __init__(self, thresholds: list[int]) -> None:
        self.thresholds = thresholds
        self.batches: list[list[tuple[int, int]]] = []

    def __call__(self, requests: list[tuple[int, int]]) -> list[Verdict]:
        self.batches.append(list(requests))
        return [Verdict(sufficient=k >= self.thresholds[index], reply=f"{index}:{k}") for index, k in requests]


# --- the authors' binary search -------------------------------------------------------------------


def test_paper_case_study_12_of_48() -> None:
    """PAPER.md §2.1 worked example: 12/48 sentences after the probes 24, 12, 6, 9, 10, 11."""
    result = search_alone("binary", 48, lambda k: k >= 12)
    assert [probe.k for probe in result.probes] == [24, 12, 6, 9, 10, 11]
    assert [probe.sufficient for probe in result.probes] == [True, True, False, False, False, False]
    assert result.chosen_k == 12
    assert result.judge_calls == 6
    assert result.prefix_ratio == 0.25
    assert not result.fallback
    assert result.monotone is None


def test_binary_keeps_one_probe_pending_and_rejects_other_lengths() -> None:
    state = BinaryPrefixSearch(48)
    assert state.pending() == [24]
    with pytest.raises(ValueError, match="got a verdict for k=12, but it is waiting for \\[24\\]"):
        state.observe(12, True)
    with pytest.raises(RuntimeError, match="not done"):
        state.result()
    state.observe(24, False)
    assert state.pending() == [36]


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 48, 100, 1000])
def test_binary_falls_back_to_the_full_trace_after_log_calls(m: int) -> None:
    result = search_alone("binary", m, lambda k: False)
    assert result.chosen_k == m
    assert result.fallback
    assert result.judge_calls == math.ceil(math.log2(m + 1))


@pytest.mark.parametrize("strategy", ["linear", "exhaustive"])
def test_other_strategies_fall_back_after_judging_everything(strategy: str) -> None:
    result = search_alone(strategy, 9, lambda k: False)
    assert (result.chosen_k, result.fallback, result.judge_calls) == (9, True, 9)


def test_only_the_last_length_sufficient_is_not_a_fallback() -> None:
    for strategy in STRATEGIES:
        result = search_alone(strategy, 10, lambda k: k == 10)
        assert (result.chosen_k, result.fallback) == (10, False)


def test_linear_stops_at_the_first_sufficient_prefix() -> None:
    result = search_alone("linear", 48, lambda k: k >= 12)
    assert [probe.k for probe in result.probes] == list(range(1, 13))
    assert result.chosen_k == 12


def test_exhaustive_asks_for_every_length_at_once() -> None:
    state = create_search("exhaustive", 5)
    assert state.pending() == [1, 2, 3, 4, 5]
    for k in (5, 3, 1, 4, 2):  # the order verdicts arrive in is kept as the probe order
        state.observe(k, k >= 3)
    result = state.result()
    assert [probe.k for probe in result.probes] == [5, 3, 1, 4, 2]
    assert (result.chosen_k, result.monotone) == (3, True)


def test_probes_keep_scores_and_replies() -> None:
    result = search_alone("binary", 4, lambda k: k >= 2)
    assert [(probe.k, probe.score, probe.reply) for probe in result.probes] == [
        (2, 2.0, "judged 2"),
        (1, 1.0, "judged 1"),
    ]
    record = result.as_record()
    assert record["judge_calls"] == 2 and record["chosen_k"] == 2 and record["prefix_ratio"] == 0.5
    assert record["probes"][0] == {"k": 2, "sufficient": True, "score": 2.0, "reply": "judged 2"}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_empty_trace_cannot_be_searched(strategy: str) -> None:
    with pytest.raises(ValueError, match="at least one unit, got m=0; skip empty traces"):
        create_search(strategy, 0)


# --- agreement under monotone judges --------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=300).flatmap(
    lambda m: st.tuples(st.just(m), st.integers(min_value=1, max_value=m + 1))
))  # fmt: skip
def test_all_strategies_agree_under_a_monotone_judge(m_and_threshold: tuple[int, int]) -> None:
    m, threshold = m_and_threshold
    results = {strategy: search_alone(strategy, m, lambda k: k >= threshold) for strategy in STRATEGIES}
    for result in results.values():
        assert result.chosen_k == min(threshold, m)
        assert result.fallback == (threshold == m + 1)
    assert results["exhaustive"].monotone is True
    assert results["binary"].judge_calls <= math.ceil(math.log2(m + 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=60))
def test_exhaustive_reports_monotonicity_and_the_smallest_sufficient(verdicts: list[bool]) -> None:
    result = search_alone("exhaustive", len(verdicts), lambda k: verdicts[k - 1])
    assert result.monotone == (verdicts == sorted(verdicts))
    assert result.chosen_k == (verdicts.index(True) + 1 if True in verdicts else len(verdicts))
    assert result.fallback == (True not in verdicts)


def test_a_non_monotone_judge_can_mislead_binary_search() -> None:
    verdicts = [False, True, False, False, True, True, True]  # sufficient at 2, then not at 3-4
    exhaustive = search_alone("exhaustive", 7, lambda k: verdicts[k - 1])
    binary = search_alone("binary", 7, lambda k: verdicts[k - 1])
    assert (exhaustive.chosen_k, exhaustive.monotone) == (2, False)
    assert binary.chosen_k == 5  # probes 4 (N), 6 (E), 5 (E): never sees k = 2


# --- the batched driver ---------------------------------------------------------------------------


def test_driver_advances_all_binary_searches_together() -> None:
    sizes = [48, 7, 1, 100, 20]
    judge = RecordingJudge(thresholds=[12, 8, 1, 37, 3])
    states: list[PrefixSearch] = [create_search("binary", m) for m in sizes]
    results = run_searches(states, judge, batch_size=len(sizes))

    expected = [search_alone("binary", m, lambda k, t=t: k >= t) for m, t in zip(sizes, judge.thresholds)]
    assert [r.chosen_k for r in results] == [e.chosen_k for e in expected] == [12, 7, 1, 37, 3]
    assert [r.fallback for r in results] == [False, True, False, False, False]
    assert [[p.k for p in r.probes] for r in results] == [[p.k for p in e.probes] for e in expected]
    # One judge batch per round, one probe per unfinished example in it.
    assert len(judge.batches) == max(r.judge_calls for r in results)
    for batch in judge.batches:
        indices = [index for index, _ in batch]
        assert len(indices) == len(set(indices))
    assert len(judge.batches[0]) == len(sizes)
    assert results[0].probes[0].reply == "0:24"


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
def test_driver_respects_the_batch_size(batch_size: int) -> None:
    sizes = [48, 7, 33, 100, 20]
    judge = RecordingJudge(thresholds=[12, 8, 40, 101, 3])
    results = run_searches([create_search("binary", m) for m in sizes], judge, batch_size)
    assert all(1 <= len(batch) <= batch_size for batch in judge.batches)
    assert sum(len(batch) for batch in judge.batches) == sum(r.judge_calls for r in results)
    assert [r.chosen_k for r in results] == [12, 7, 33, 100, 3]
    assert results[3].fallback


def test_driver_judges_every_exhaustive_length_in_one_round() -> None:
    sizes = [5, 3, 4]
    judge = RecordingJudge(thresholds=[2, 4, 1])
    results = run_searches([create_search("exhaustive", m) for m in sizes], judge, batch_size=5, progress=True)
    assert [len(batch) for batch in judge.batches] == [5, 5, 2]
    assert [r.chosen_k for r in results] == [2, 3, 1]
    assert [r.fallback for r in results] == [False, True, False]
    assert all(r.monotone for r in results)


def test_driver_mixes_strategies_and_handles_no_examples() -> None:
    judge = RecordingJudge(thresholds=[5, 5])
    states = [create_search("linear", 10), create_search("binary", 10)]
    results = run_searches(states, judge, batch_size=8)
    assert [r.chosen_k for r in results] == [5, 5]
    assert len(judge.batches) == 5  # linear needs 5 rounds, binary's 4 probes ride along
    assert run_searches([], judge, batch_size=8) == []


def test_driver_rejects_a_judge_that_drops_verdicts() -> None:
    def lossy_judge(requests: list[tuple[int, int]]) -> list[Verdict]:
        return [Verdict(sufficient=True)] * (len(requests) - 1)

    with pytest.raises(ValueError, match="returned 1 verdicts for 2 requests"):
        run_searches([create_search("binary", 4), create_search("binary", 4)], lossy_judge, 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_searches([create_search("binary", 4)], lossy_judge, 0)


# --- fixed-ratio baseline -------------------------------------------------------------------------


def test_fixed_ratio_examples() -> None:
    assert fixed_ratio_k(48, 0.25) == 12
    assert fixed_ratio_k(10, 0.25) == 3
    assert fixed_ratio_k(30, 0.1) == 3  # 0.1 * 30 == 3.0000000000000004 in floating point
    assert fixed_ratio_k(100, 0.07) == 7  # 0.07 * 100 == 7.000000000000001
    assert fixed_ratio_k(5, 0.0) == 1
    assert fixed_ratio_k(5, 1.0) == 5
    with pytest.raises(ValueError, match="ratio in \\[0, 1\\]"):
        fixed_ratio_k(5, 1.5)
    with pytest.raises(ValueError, match="m >= 1"):
        fixed_ratio_k(0, 0.5)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=10_000), st.integers(min_value=0, max_value=100))
def test_fixed_ratio_is_the_exact_ceiling_never_zero(m: int, percent: int) -> None:
    ratio = percent / 100
    k = fixed_ratio_k(m, ratio)
    assert 1 <= k <= m
    assert k == max(1, math.ceil(Fraction(percent, 100) * m))
