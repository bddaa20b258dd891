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
    assert lines[3] == (
        "| Qwen3-8B | SFT (Long-CoT) | – | – | – | – | – | – | 80.00 | 90.00 | 80.00 | 90.00 |"
    )

    rows = list(csv.reader(io.StringIO(csv_text)))
    assert rows[0][:2] == ["Student", "Method"] and len(rows[0]) == 12
    assert rows[2][2:4] == ["", ""] and rows[2][-2:] == ["80.00", "90.00"]


def test_results_table_rejects_benchmarks_that_are_not_columns() -> None:
    with pytest.raises(ValueError, match="gsm8k"):
        results_table({("s", "m"): {"gsm8k": {"pass@1": 1.0, "pass@3": 2.0}}})
