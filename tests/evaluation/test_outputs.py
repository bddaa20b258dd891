"""Evaluation outputs are named by the evaluation's settings: a second `stage=eval` with other
sampling, benchmarks or pass@k keeps the first's results.md and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palign.pipeline import run
from tests.conftest import compose_config

FAST = ["experiment=tiny", "logger=none", "baseline=sft_short_cot"]


def outputs(folder):
    return {name: (folder / name).read_text() for name in ("results.md", "results.csv", "metrics.json")}


@pytest.mark.slow
def test_each_evaluation_setting_keeps_its_own_results(tmp_path):
    trained = run(compose_config(FAST, tmp_path))  # train, then evaluate with experiment=tiny's settings
    (run_dir,) = (tmp_path / "runs").iterdir()
    first = Path(trained["eval"]["results"])
    assert first.parent.parent == run_dir / "eval" and first.name.startswith("champ_heldout-pass2-")
    first_outputs = outputs(first)
    assert outputs(run_dir) == first_outputs  # the run folder's copy is the latest evaluation
    predictions = (first.parent / "champ_heldout.jsonl").read_text()

    more_samples = run(
        compose_config([*FAST, "stage=eval", "evaluation.sampling.num_samples=3", "evaluation.pass_k=3"], tmp_path)
    )
    fewer_problems = run(compose_config([*FAST, "stage=eval", "evaluation.benchmarks.champ_heldout.limit=1"], tmp_path))
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]  # all three evaluated the same trained run
    second, third = (Path(s["eval"]["results"]) for s in (more_samples, fewer_problems))
    assert len({first, second, third}) == 3
    assert outputs(first) == first_outputs  # untouched by the later evaluations
    # other sampling: other predictions; the same sampling on fewer problems: the same predictions, reused
    assert second.parent != first.parent and third.parent == first.parent
    assert (first.parent / "champ_heldout.jsonl").read_text() == predictions

    metrics = [json.loads((f / "metrics.json").read_text())["champ_heldout"] for f in (first, second, third)]
    graded = [
        [json.loads(line) for line in (f / "champ_heldout.graded.jsonl").read_text().splitlines()]
        for f in (first, second, third)
    ]
    assert [(len(rows), len(rows[0]["correct"])) for rows in graded] == [(2, 2), (2, 3), (1, 2)]  # each its own grades
    assert [(m["num_problems"], m["num_samples"]) for m in metrics] == [(2, 2), (2, 3), (1, 2)]
    assert "CHAMP_HELDOUT Pass@3" in (second / "results.csv").read_text().splitlines()[0]
    settings = json.loads((third / "evaluation.json").read_text())
    assert settings["pass_k"] == 2 and settings["benchmarks"]["champ_heldout"]["limit"] == 1
    assert settings["predictions"]["sampling"]["num_samples"] == 2
    assert (
        outputs(run_dir) == outputs(third)
        and fewer_problems["eval"]["benchmarks"]["champ_heldout"]["num_problems"] == 1
    )

    # the first setting again: its own folder, same results, and the latest copy is it again
    again = run(compose_config([*FAST, "stage=eval"], tmp_path))
    assert Path(again["eval"]["results"]) == first
    assert outputs(first) == first_outputs == outputs(run_dir)


def test_results_carry_each_cell_s_interval_and_the_tracker_gets_per_problem_rows(tmp_path):
    """results.md shows every cell with its interval, results.csv has them in columns of their own,
    metrics.json and the summary hold the bounds, and the two W&B tables per benchmark have the
    benchmark, the gold answer and one row per problem."""
    import csv
    import io

    from palign.evaluation.harness import BenchmarkResult, add_intervals, log_result_tables, write_results
    from palign.evaluation.metrics import mean_interval, summarize_correctness
    from palign.schema import Intervals

    predictions = tmp_path / "eval" / "fp"
    predictions.mkdir(parents=True)
    (predictions / "settings.json").write_text("{}")
    correct = {"aime24": [[True, False, True]] * 10 + [[False] * 3] * 20, "aime25": [[False] * 3] * 30}
    results = {}
    for name, matrix in correct.items():
        rows = [
            {"id": f"{name}-{i}", "answer": str(i), "correct": c, "extracted": ["1"] * 3, "output": ["x"] * 3}
            for i, c in enumerate(matrix)
        ]
        results[name] = BenchmarkResult(
            name,
            summarize_correctness(matrix),
            predictions / f"{name}.jsonl",
            predictions / f"{name}.graded.jsonl",
            rows,
        )
    settings = Intervals()
    averages = add_intervals(results, 3, settings)
    # AIME24: 10 of 30 problems with 2 of 3 samples right; AIME25 all wrong: Wilson's [0, 11.35]
    aime24 = mean_interval([2 / 3] * 10 + [0.0] * 20, settings)
    assert (results["aime24"].summary["pass@1_ci_low"], results["aime24"].summary["pass@1_ci_high"]) == pytest.approx(
        (100 * aime24.low, 100 * aime24.high)
    )
    assert results["aime25"].summary["pass@3_ci_low"] == 0.0
    assert results["aime25"].summary["pass@3_ci_high"] == pytest.approx(100 * 3.8414588 / 33.8414588)
    assert averages["avg_pass@1_ci_low"] < (100 * 20 / 90) / 2 < averages["avg_pass@1_ci_high"]

    markdown, folder = write_results(
        results, "s", "m", tmp_path, 3, {n: {"name": n} for n in results}, averages, settings
    )
    assert "| AIME24 | 22.22 [" in markdown and "| AIME25 | 0.00 [0.0, 11.4] | 0.00 [0.0, 11.4] |" in markdown
    assert "BCa bootstrap over problems (scipy.stats.bootstrap, 9999 resamples, seed 0)" in markdown
    header, row = list(csv.reader(io.StringIO((tmp_path / "results.csv").read_text())))
    cells = dict(zip(header, row))
    assert header[:4] == ["Student", "Method", "AIME25 Pass@1", "AIME25 Pass@3"]  # Table 1's columns first
    assert header[8:12] == [
        "AIME25 Pass@1 ci_low",
        "AIME25 Pass@1 ci_high",
        "AIME25 Pass@3 ci_low",
        "AIME25 Pass@3 ci_high",
    ]
    assert (cells["AIME25 Pass@3"], cells["AIME25 Pass@3 ci_low"], cells["AIME25 Pass@3 ci_high"]) == (
        "0.00",
        "0.00",
        "11.35",
    )
    assert float(cells["Avg Pass@1 ci_low"]) == pytest.approx(averages["avg_pass@1_ci_low"], abs=0.005)
    assert json.loads((folder / "metrics.json").read_text())["aime24"]["pass@1_ci_high"] == pytest.approx(
        100 * aime24.high
    )

    class Tracker:
        def __init__(self):
            self.tables = {}

        def log_table(self, key, columns, rows):
            self.tables[key] = (columns, rows)

    tracker = Tracker()
    log_result_tables(tracker, "aime24", results["aime24"], 3)
    columns, rows = tracker.tables["eval/aime24/problems"]
    assert columns == [
        "benchmark",
        "problem",
        "gold",
        "samples",
        "correct samples",
        "sample correct",
        "pass@1",
        "pass@3",
    ]
    assert rows[0] == ["aime24", "aime24-0", "0", 3, 2, "101", pytest.approx(200 / 3), 100.0]
    assert rows[-1] == ["aime24", "aime24-29", "29", 3, 0, "000", 0.0, 0.0] and len(rows) == 30
    columns, rows = tracker.tables["eval/aime24/predictions"]
    assert columns[:4] == ["benchmark", "problem", "sample", "gold"] and len(rows) == 90
    assert rows[1][:6] == ["aime24", "aime24-0", 1, "0", "1", False]
