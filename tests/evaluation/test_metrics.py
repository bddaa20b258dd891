"""Pass@k metrics against hand-computed values, the torchmetrics classes, and the Table 1 layout."""

from __future__ import annotations

import csv
import io
from math import comb

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from palign.evaluation.metrics import (
    FirstSampleAccuracy,
    MeanSampleAccuracy,
    PassAtK,
    pass_at_k,
    summarize_correctness,
)
from palign.evaluation.predictions import results_table


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (3, 1, 1, 1 / 3),
        (3, 1, 3, 1.0),
        (5, 2, 2, 0.7),
        (3, 0, 1, 0.0),
        (3, 0, 3, 0.0),
        (3, 3, 1, 1.0),
        (4, 1, 2, 0.5),
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_the_binomial_formula(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


CORRECT = torch.tensor(
    [
        [True, False, False],  # c=1
        [False, True, True],  # c=2
        [False, False, False],  # c=0
        [True, True, True],  # c=3
    ]
)


def test_metric_classes_on_a_known_matrix() -> None:
    pass1, pass2, pass3 = PassAtK(1), PassAtK(2), PassAtK(3)
    mean_acc, first_acc = MeanSampleAccuracy(), FirstSampleAccuracy()
    for metric in (pass1, pass2, pass3, mean_acc, first_acc):
        metric.update(CORRECT)
    assert pass1.compute().item() == pytest.approx((1 / 3 + 2 / 3 + 0 + 1) / 4)
    assert pass2.compute().item() == pytest.approx((2 / 3 + 1 + 0 + 1) / 4)
    assert pass3.compute().item() == pytest.approx(3 / 4)
    assert mean_acc.compute().item() == pytest.approx(6 / 12)
    assert first_acc.compute().item() == pytest.approx(2 / 4)


@pytest.mark.parametrize("make_metric", [lambda: PassAtK(2), MeanSampleAccuracy, FirstSampleAccuracy])
def test_states_reduce_by_sum_across_ranks(make_metric) -> None:
    # Two "ranks" see different problems; merging their states (the DDP reduction) must equal
    # one metric that saw every problem.
    whole, rank0, rank1 = make_metric(), make_metric(), make_metric()
    whole.update(CORRECT)
    rank0.update(CORRECT[:1])
    rank1.update(CORRECT[1:])
    assert all(fx.__name__ == "dim_zero_sum" for fx in rank0._reductions.values())
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(whole.compute().item())


def test_pass_at_k_metric_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="pass@4 from 3 samples"):
        PassAtK(4).update(CORRECT)


def test_update_rejects_a_vector() -> None:
    with pytest.raises(ValueError, match="num_problems, n_samples"):
        MeanSampleAccuracy().update(torch.tensor([True, False]))


def test_summarize_correctness_in_percent() -> None:
    summary = summarize_correctness(CORRECT.tolist())
    assert summary == pytest.approx(
        {"pass@1": 50.0, "pass@1_first": 50.0, "pass@3": 75.0, "num_problems": 4, "num_samples": 3}
    )
    with pytest.raises(ValueError):
        summarize_correctness([])


def test_results_table_layout_averages_and_missing_cells() -> None:
    # The paper's Table 1 row for Qwen2.5-7B-Instruct + P-ALIGN (PAPER.md §7.1) as exact fractions.
    # Its Avg (39.64) is the mean of the printed cells; the exact fractions would average to 39.63.
    paper_row = {
        "aime25": {"pass@1": 100 * 5 / 30, "pass@3": 100 * 8 / 30},
        "aime24": {"pass@1": 100 * 5 / 30, "pass@3": 100 * 8 / 30},
        "amc12": {"pass@1": 100 * 41 / 83, "pass@3": 100 * 53 / 83},
        "math500": {"pass@1": 100 * 379 / 500, "pass@3": 100 * 426 / 500},
    }
    partial_row = {"math500": {"pass@1": 80.0, "pass@3": 90.0}}
    markdown, csv_text = results_table(
        {("Qwen2.5-7B-Instruct", "P-ALIGN"): paper_row, ("Qwen3-8B", "SFT (Long-CoT)"): partial_row}
    )
    lines = markdown.strip().splitlines()
    assert lines[0].split(" | ")[2:4] == ["AIME25 Pass@1", "AIME25 Pass@3"]
    assert lines[0].rstrip(" |").endswith("Avg Pass@1 | Avg Pass@3")
    assert lines[2] == (
        "| Qwen2.5-7B-Instruct | P-ALIGN | 16.67 | 26.67 | 16.67 | 26.67 | 49.40 | 63.86 | 75.80 | 85.20"
        " | 39.64 | 50.60 |"
    )
    assert lines[3] == ("| Qwen3-8B | SFT (Long-CoT) | – | – | – | – | – | – | 80.00 | 90.00 | 80.00 | 90.00 |")

    rows = list(csv.reader(io.StringIO(csv_text)))
    assert rows[0][:2] == ["Student", "Method"] and len(rows[0]) == 12
    assert rows[2][2:4] == ["", ""] and rows[2][-2:] == ["80.00", "90.00"]


def test_results_table_rejects_benchmarks_that_are_not_columns() -> None:
    with pytest.raises(ValueError, match="gsm8k"):
        results_table({("s", "m"): {"gsm8k": {"pass@1": 1.0, "pass@3": 2.0}}})


# -- intervals (palign/evaluation/metrics.py: BCa bootstrap over problems, Wilson at the edges, MOVER for Avg) --

import math  # noqa: E402

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from palign.evaluation.metrics import Interval, cell_intervals, mean_interval, mover_sum, problem_scores  # noqa: E402
from palign.schema import Intervals  # noqa: E402

SETTINGS = Intervals()
Z = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson's score interval written out (Wilson 1927), to check the library against by hand."""
    p = successes / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("n", [1, 6, 30, 500])
def test_all_wrong_and_all_right_are_not_certainty(n: int) -> None:
    wrong, right = mean_interval(np.zeros(n), SETTINGS), mean_interval(np.ones(n), SETTINGS)
    # 0 of n: [0, z^2 / (n + z^2)], the upper bound hand-computed; all right mirrors it
    assert (wrong.low, wrong.method) == (0.0, "wilson") and wrong.high == pytest.approx(Z * Z / (n + Z * Z))
    assert right.low == pytest.approx(1 - Z * Z / (n + Z * Z)) and right.high == 1.0
    assert wrong.high > 0 and right.low < 1  # never a point
    ci = stats.binomtest(0, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (wrong.low, wrong.high) == pytest.approx((ci.low, ci.high))


def test_the_demo_s_all_wrong_table_cell_has_an_interval() -> None:
    # 6 problems x 2 samples, none correct (the demo's whole Table 1 before intervals): 0 of 6 problems
    cells = cell_intervals(np.zeros((6, 2), dtype=bool), ["pass@1", "pass@2", "pass@1_first"], SETTINGS)
    expected = 100 * Z * Z / (6 + Z * Z)  # 39.0%
    assert {m: (i.low, round(i.high, 6)) for m, i in cells.items()} == {m: (0.0, round(expected, 6)) for m in cells}


def test_a_cell_where_every_problem_scores_the_same_share_counts_whole_problems() -> None:
    # every problem 1 of 2 samples right: no spread between problems; Wilson over 4 problems at 2 of 4
    interval = mean_interval(problem_scores(np.array([[1, 0]] * 4, dtype=bool), "pass@1"), SETTINGS)
    assert (interval.low, interval.high) == pytest.approx(wilson(2, 4)) and interval.method == "wilson"


def test_bca_bootstrap_on_a_hand_computed_small_case() -> None:
    # Three problems scoring 0, 0, 1 (mean 1/3). The bootstrap mean counts the 1s in three draws, Binomial(3, 1/3):
    # P(0) = 8/27, P(1/3) = 12/27, P(2/3) = 6/27, P(1) = 1/27. BCa (Efron & Tibshirani 1993, 14.3), with scipy's
    # mid-rank bias correction z0 = Phi^-1((P(mean* < 1/3) + P(mean* <= 1/3)) / 2) = Phi^-1(14/27) = 0.046; the
    # jackknife means are 1/2, 1/2, 0, so d = mean - theta_i = (-1/6, -1/6, 1/3) and the acceleration
    # a = sum(d^3) / (6 sum(d^2)^1.5) = (1/36) / (6 (1/6)^1.5) = 0.068. The 2.5% end moves to
    # Phi(z0 + (z0 - 1.96) / (1 - a (z0 - 1.96))) = Phi(-1.65) = 5%, under P(0) = 30%: 0. The 97.5% end moves to
    # Phi(z0 + (z0 + 1.96) / (1 - a (z0 + 1.96))) = Phi(2.37) = 99.1%, over P(mean* <= 2/3) = 26/27 = 96.3%: 1.
    # Both land far from the distribution's jumps, so the resampling noise cannot move them: [0, 1].
    interval = mean_interval([0.0, 0.0, 1.0], SETTINGS)
    assert interval.method == "bca"
    assert (interval.low, interval.high) == (0.0, 1.0)


def test_the_cell_interval_is_scipy_s_bca_bootstrap_with_the_configured_seed() -> None:
    settings = Intervals(confidence_level=0.9, resamples=2000, seed=3)

    def scipy_bca(values):
        return stats.bootstrap(
            (values,), np.mean, n_resamples=2000, confidence_level=0.9, method="BCa", rng=np.random.default_rng(3)
        ).confidence_interval

    # scores without a small common denominator: scipy's interval, bit for bit
    scores = np.random.default_rng(7).random(30)
    ours, theirs = mean_interval(scores, settings), scipy_bca(scores)
    assert (ours.low, ours.high) == (theirs.low, theirs.high) and ours.low < scores.mean() < ours.high
    # per-problem Pass@1 of 3 samples (thirds): scipy's interval of the whole numbers of correct samples, over 3,
    # so that a resampled mean equal to the estimate is equal in floating point too (BCa counts those ties)
    correct = np.random.default_rng(7).random((30, 3)) < 0.4
    scores = problem_scores(correct, "pass@1")
    ours, theirs = mean_interval(scores, settings), scipy_bca(correct.sum(axis=1).astype(float))
    assert (ours.low, ours.high) == pytest.approx((theirs.low / 3, theirs.high / 3), abs=1e-12)
    assert mean_interval(scores, settings) == ours  # the same seed, the same interval
    assert mean_interval(scores, Intervals(confidence_level=0.9, resamples=2000, seed=4)) != ours
    # the same scores by another float path (averaged over two identical seeds) give the same interval
    assert mean_interval((scores + correct.sum(axis=1) / 3) / 2, settings) == ours


def test_problem_scores_per_metric() -> None:
    assert problem_scores(CORRECT, "pass@1").tolist() == pytest.approx([1 / 3, 2 / 3, 0, 1])
    assert problem_scores(CORRECT, "pass@1_first").tolist() == [1, 0, 0, 1]
    assert problem_scores(CORRECT, "pass@2").tolist() == pytest.approx([2 / 3, 1, 0, 1])
    assert problem_scores(CORRECT, "pass@3").tolist() == [1, 1, 0, 1]
    with pytest.raises(ValueError, match="pass@4 from 3 samples"):
        problem_scores(CORRECT, "pass@4")
    with pytest.raises(ValueError, match="unknown metric"):
        problem_scores(CORRECT, "accuracy")


def test_the_avg_interval_adds_the_benchmarks_arms_in_quadrature() -> None:
    # MOVER (Zou & Donner 2008) for (a + b) / 2: 0.4 - sqrt(0.1^2 + 0.1^2) / 2 and 0.4 + sqrt(0.15^2 + 0.1^2) / 2
    avg = mover_sum([0.2, 0.6], [Interval(0.1, 0.35, "bca"), Interval(0.5, 0.7, "bca")], 0.5)
    assert (avg.low, avg.high) == pytest.approx((0.4 - math.sqrt(0.02) / 2, 0.4 + math.sqrt(0.0325) / 2))
    one = Interval(0.1, 0.35, "bca")
    assert (mover_sum([0.2], [one]).low, mover_sum([0.2], [one]).high) == pytest.approx((0.1, 0.35))  # one benchmark
    # an all-wrong benchmark keeps the Avg from collapsing too
    zero = mean_interval(np.zeros(30), SETTINGS)
    both = mover_sum([0.0, 0.0], [zero, zero], 0.5)
    assert both.low == 0.0 and both.high == pytest.approx(math.sqrt(2) * zero.high / 2)
