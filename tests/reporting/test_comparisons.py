"""Comparisons a researcher can trust (palign/reporting/comparisons.py, tables.py, published.py):
paired differences with known answers, refusal of runs that evaluated other problems or sample
counts, seeds pooled into one row, intervals in the tables, the published row beside a run (the
authors' released AIME outputs graded with stage=grade), the forest plot, and what an offline W&B
run holds (per-problem table, interval metrics, define_metric, the ablation's knob)."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from palign.artifacts.errors import DataFormatError
from palign.evaluation.metrics import mean_interval, summarize_correctness
from palign.reporting.comparisons import IncomparableRuns, Outcomes, average_difference, paired_difference
from palign.reporting.published import PUBLISHED_FILE, load_published, select_published, verdict
from palign.reporting.tables import (
    KNOBS,
    RunRecord,
    ablation_table,
    build_tables,
    collect_local_runs,
    collect_wandb_runs,
    pool_seeds,
    reproduction_table,
    table1,
)
from palign.schema import Intervals, Report
from tests.conftest import run_cli
from tests.helpers.wandb_log import read_offline_run
from tests.reporting.test_reporting import BASELINES as REPORTING_BASELINES
from tests.reporting.test_reporting import STUDENT, _make_table_module, assert_png, base_config, md_rows

SETTINGS = Intervals()
Z = 1.959963984540054
WILSON_0_OF_30 = Z * Z / (30 + Z * Z)  # the upper Wilson bound of 0 of 30: 11.35%
BASELINES = {name: REPORTING_BASELINES[name] for name in ("sft_long_cot", "palign")}  # conf/baseline/'s


def outcomes(run: str, correct, ids=None, benchmark: str = "aime24") -> Outcomes:
    correct = np.asarray(correct, dtype=bool).reshape(len(correct), -1)
    ids = tuple(ids or (f"p{i}" for i in range(len(correct))))
    return Outcomes(benchmark, ids, (correct,), (run,))


def first(n: int, of: int = 30) -> list[bool]:
    """Problems 0..n-1 of `of` right (one sample each)."""
    return [i < n for i in range(of)]


# -- paired differences: known answers ------------------------------------------------------------


def test_a_constructed_pair_with_a_known_difference():
    # A solves problems 0-19 of 30, B problems 0-9: +33.33 points, resting on 10 discordant problems
    a, b = outcomes("A", first(20)), outcomes("B", first(10))
    diff = paired_difference(a, b, "pass@1", SETTINGS)
    assert diff.delta == pytest.approx(100 / 3) and diff.problems == 30
    # the sign-flip test: 10 problems with d = 1, the rest 0: P(|sum of 10 random signs| >= 10) = 2 / 2^10 = 0.002
    assert 0.0005 < diff.p_value < 0.005
    assert diff.interval.low > 0 and diff.interval.low < diff.delta < diff.interval.high and diff.marked
    reverse = paired_difference(b, a, "pass@1", SETTINGS)
    assert reverse.delta == pytest.approx(-100 / 3) and reverse.interval.high < 0 and reverse.marked
    # a difference the problems cannot tell apart from noise: one problem
    near = paired_difference(outcomes("A", first(11)), outcomes("B", first(10)), "pass@1", SETTINGS)
    assert near.delta == pytest.approx(100 / 30) and near.p_value > 0.9 and not near.marked  # exactly 1 by enumeration


def test_pairing_follows_the_problem_ids_not_the_order():
    a = outcomes("A", [True, False, True], ids=["x", "y", "z"])
    b = outcomes("B", [False, True, True], ids=["z", "x", "y"])  # B got x and y right, z wrong
    diff = paired_difference(a, b, "pass@1", SETTINGS)
    # per problem: x 1-1 = 0, y 0-1 = -1, z 1-0 = +1
    assert diff.delta == pytest.approx(0.0)


def test_the_exact_permutation_p_value_by_hand():
    # d = (1, 1, 1, 0, 0): 2^5 = 32 sign patterns, few enough for scipy to enumerate them all; only the three 1s
    # move the sum, which is 3 in 1 pattern of 8 and -3 in another: two-sided p = 2 x 1/8 = 0.25
    diff = paired_difference(outcomes("A", [1, 1, 1, 0, 0]), outcomes("B", [0, 0, 0, 0, 0]), "pass@1", SETTINGS)
    assert diff.p_value == 0.25 and diff.delta == pytest.approx(60.0)
    assert not diff.marked  # five problems: 60 points is not beyond chance


def test_two_all_wrong_runs_differ_by_zero_with_an_interval():
    zero = outcomes("A", first(0)), outcomes("B", first(0))
    diff = paired_difference(*zero, "pass@1", SETTINGS)
    # Newcombe's square-and-add of the two Wilson intervals: 0 -/+ sqrt(0^2 + 11.35^2)
    assert diff.delta == 0.0 and diff.p_value == 1.0 and not diff.marked
    assert (diff.interval.low, diff.interval.high) == pytest.approx((-100 * WILSON_0_OF_30, 100 * WILSON_0_OF_30))


def test_the_avg_difference_is_mover_over_benchmarks_and_a_stratified_permutation_test():
    rows = [outcomes("A", [1, 1, 1, 0, 0], benchmark="aime24"), outcomes("A", first(3, of=5), benchmark="aime25")]
    refs = [outcomes("B", [0] * 5, benchmark="aime24"), outcomes("B", first(3, of=5), benchmark="aime25")]
    per = [paired_difference(r, f, "pass@1", SETTINGS) for r, f in zip(rows, refs)]
    avg = average_difference(rows, refs, "pass@1", SETTINGS)
    assert avg.delta == pytest.approx(30.0) and avg.problems == 10
    below = math.sqrt(sum((d.delta - d.interval.low) ** 2 for d in per)) / 2
    above = math.sqrt(sum((d.interval.high - d.delta) ** 2 for d in per)) / 2
    assert (avg.interval.low, avg.interval.high) == pytest.approx((30 - below, 30 + above))
    # 2^10 patterns, enumerated: again only three d = 1 move the weighted sum: p = 0.25
    assert avg.p_value == 0.25
    with pytest.raises(IncomparableRuns, match="different benchmarks"):
        average_difference(rows, refs[::-1], "pass@1", SETTINGS)


def test_runs_that_evaluated_other_problems_or_sample_counts_are_refused():
    a = outcomes("run-A", first(10))
    other = outcomes("run-B", first(10), ids=[f"p{i}" for i in range(25)] + [f"q{i}" for i in range(5)])
    with pytest.raises(IncomparableRuns) as refused:
        paired_difference(a, other, "pass@1", SETTINGS)
    message = str(refused.value)
    assert "run-A and run-B on aime24: they evaluated different problems (30 and 30 problems" in message
    assert "5 only in run-A (p25, p26, p27, p28, p29)" in message and "5 only in run-B (q0, q1, q2, q3, q4)" in message
    three = outcomes("run-C", np.zeros((30, 3)))
    with pytest.raises(
        IncomparableRuns,
        match=r"run-A and run-C on aime24: they drew different numbers of samples per "
        r"problem \(1 and 3\)",
    ):
        paired_difference(a, three, "pass@1", SETTINGS)


# -- runs on disk, with graded predictions --------------------------------------------------------


def write_graded_run(
    runs: Path,
    name: str,
    baseline: str,
    graded: dict[str, list],
    *,
    seed: int = 0,
    ids: dict[str, list[str]] | None = None,
    student: str = STUDENT,
    set_: dict | None = None,
) -> Path:
    """A run folder as the pipeline leaves it, with its evaluation's graded predictions: `graded` is
    {benchmark: [per-problem list of per-sample correctness]}; the summary is computed from them."""
    config = base_config(student)
    config["baseline"], config["seed"] = copy.deepcopy(BASELINES[baseline]), seed
    for dotted, value in (set_ or {}).items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    folder = runs / name
    results = folder / "eval" / "abc" / f"{'+'.join(graded)}-pass3-x"
    results.mkdir(parents=True)
    benchmarks = {}
    for benchmark, matrix in graded.items():
        problem_ids = (ids or {}).get(benchmark) or [f"p{i}" for i in range(len(matrix))]
        rows = [{"id": pid, "answer": "1", "correct": [bool(c) for c in row]} for pid, row in zip(problem_ids, matrix)]
        (results / f"{benchmark}.graded.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        benchmarks[benchmark] = {**summarize_correctness(matrix), "max_new_tokens": 4096}
    summary = {"eval": {"benchmarks": benchmarks, "results": str(results), "model": "student"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def three_samples(right: list[int]) -> list[list[bool]]:
    """Per problem, how many of its 3 samples are right (the first ones)."""
    return [[s < r for s in range(3)] for r in right]


RIGHT_LONG = [0] * 20 + [1] * 5 + [3] * 5  # sft_long_cot: 5 problems 1 of 3, 5 problems 3 of 3
RIGHT_PALIGN = [0] * 10 + [2] * 10 + [3] * 10  # palign: 10 problems 2 of 3, 10 problems 3 of 3


def test_table1_cells_carry_intervals_and_paired_differences_from_the_reference(tmp_path):
    runs = tmp_path / "runs"
    write_graded_run(runs, "long", "sft_long_cot", {"aime24": three_samples(RIGHT_LONG)})
    write_graded_run(runs, "palign", "palign", {"aime24": three_samples(RIGHT_PALIGN)})
    finished, _ = collect_local_runs(runs)
    table = build_tables(finished, Report(), 3)["table1"]
    rows = md_rows(table.markdown)
    cell = rows[(STUDENT, "palign")]
    # the value as the paper prints it, then the interval of the BCa bootstrap over the 30 problems
    interval = mean_interval(np.array(RIGHT_PALIGN) / 3, SETTINGS)
    assert cell[0] == f"{100 * 50 / 90:.2f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"
    assert re.fullmatch(r"66\.67 \[\d+\.\d, \d+\.\d\]", cell[1])  # Pass@3: 20 of 30 problems
    assert cell[2:4] == cell[0:2]  # one benchmark: Avg is its cell
    assert rows[(STUDENT, "sft_long_cot")][-2:] == ["ref", "ref"]
    # palign - long: Pass@1 50/90 - 20/90 = +33.33 (per problem: +2/3 on 15 problems, 0 on the other 15)
    assert re.fullmatch(r"\+33\.33 \[\d+\.\d, \d+\.\d\] p=0\.\d+ \*", cell[4]), cell[4]
    assert "BCa bootstrap over problems (scipy.stats.bootstrap, 9999 resamples, seed 0)" in table.markdown
    assert "Wilson score interval over problems" in table.markdown
    assert "paired sign-flip permutation test" in table.markdown
    assert "Problems each comparison rests on: palign vs sft_long_cot: AIME24 30 problems." in table.markdown
    diffs = md_rows(table.markdown[table.markdown.index("| Student | Method | AIME24 ΔPass@1") :])
    assert diffs[(STUDENT, "palign")][0] == cell[4]  # AIME24 ΔPass@1, and the Avg the same
    # the CSV: every value, bound, spread, difference and p-value in its own column
    header, *body = csv.reader(io.StringIO(table.csv))
    palign = dict(zip(header, next(r for r in body if r[1] == "palign")))
    assert (palign["AIME24 Pass@1"], palign["AIME24 Pass@1 ci_low"], palign["AIME24 Pass@1 ci_high"]) == (
        "55.56",
        f"{100 * interval.low:.2f}",
        f"{100 * interval.high:.2f}",
    )
    assert palign["Δ Avg Pass@1"] == "+33.33" and float(palign["Δ Avg Pass@1 p"]) < 0.01
    assert (
        float(palign["Δ AIME24 Pass@3 ci_low"])
        < float(palign["Δ AIME24 Pass@3"])
        < float(palign["Δ AIME24 Pass@3 ci_high"])
    )
    assert palign["AIME24 Pass@1 seed_sd"] == "" and palign["Run"] == "palign"
    assert [(r.label, r.column, r.metric) for r in table.forest] == [
        ("palign", "AIME24", "Pass@1"),
        ("palign", "AIME24", "Pass@3"),
        ("palign", "Avg", "Pass@1"),
        ("palign", "Avg", "Pass@3"),
    ]


def test_a_comparison_between_runs_on_other_problems_is_refused_in_the_table(tmp_path):
    runs = tmp_path / "runs"
    write_graded_run(runs, "long", "sft_long_cot", {"aime24": three_samples(RIGHT_LONG)})
    write_graded_run(runs, "palign-25", "palign", {"aime24": three_samples(RIGHT_PALIGN[:25])})
    table = build_tables(collect_local_runs(runs)[0], Report(), 3)["table1"]
    assert md_rows(table.markdown)[(STUDENT, "palign")][-2:] == ["refused", "refused"]
    assert (
        "Not compared: cannot compare palign-25 and long on aime24: they evaluated different problems "
        "(25 and 30 problems; 5 only in long (p25, p26, p27, p28, p29)); evaluate both on the same problems."
    ) in table.markdown
    assert table.forest == ()


def test_seeds_of_one_setting_are_one_row_with_mean_spread_and_runs(tmp_path):
    runs = tmp_path / "runs"
    write_graded_run(runs, "long", "sft_long_cot", {"aime24": three_samples(RIGHT_LONG)})
    seed0, seed1 = [0] * 10 + [2] * 10 + [3] * 10, [0] * 15 + [3] * 15  # Pass@1 50/90 and 45/90
    write_graded_run(runs, "palign-s0", "palign", {"aime24": three_samples(seed0)}, seed=0)
    write_graded_run(runs, "palign-s1", "palign", {"aime24": three_samples(seed1)}, seed=1)
    finished, _ = collect_local_runs(runs)
    rows, notes = pool_seeds(finished)
    assert notes == [] and [r.name for r in rows] == ["long", "palign-s0+palign-s1"]
    pooled = rows[1]
    assert [m.name for m in pooled.members] == ["palign-s0", "palign-s1"]
    cells = pooled.benchmarks["aime24"]
    assert cells["pass@1"] == pytest.approx(100 * 47.5 / 90)
    assert cells["pass@1_seed_sd"] == pytest.approx(math.sqrt(2) / 2 * 100 * 5 / 90)  # sd of (50/90, 45/90)
    assert cells["pass@3"] == pytest.approx(100 * 17.5 / 30) and cells["pass@3_seed_sd"] == pytest.approx(
        100 * 5 / 30 / math.sqrt(2)
    )
    # the interval: the bootstrap over problems of each problem's score averaged over the seeds
    averaged = (np.array(seed0) + np.array(seed1)) / 6
    pooled_interval, by_hand = (
        pooled.outcomes()["aime24"].interval("pass@1", SETTINGS),
        mean_interval(averaged, SETTINGS),
    )
    assert (pooled_interval.low, pooled_interval.high) == pytest.approx((100 * by_hand.low, 100 * by_hand.high))

    table = table1(rows, Report(), 3)
    md = md_rows(table.markdown)
    assert list(md) == [(STUDENT, "sft_long_cot"), (STUDENT, "palign")]  # one row per baseline
    interval = mean_interval(averaged, SETTINGS)
    assert md[(STUDENT, "palign")][0] == (
        f"52.78 [{100 * interval.low:.1f}, {100 * interval.high:.1f}] sd {100 * 5 / 90 / math.sqrt(2):.1f}"
    )
    assert "sd: standard deviation of the cell over the seeds" in table.markdown
    samples = md_rows(table.markdown[table.markdown.index("| Student | Method | AIME24 | Run |") :])
    assert samples[(STUDENT, "palign")] == ["30×3 (4096 tok)", "palign-s0 (seed 0); palign-s1 (seed 1)"]
    header, *body = csv.reader(io.StringIO(table.csv))
    row = dict(zip(header, body[1]))
    assert row["AIME24 Pass@1"] == "52.78" and row["AIME24 Pass@1 seed_sd"] == f"{100 * 5 / 90 / math.sqrt(2):.2f}"
    assert row["Run"] == "palign-s0 (seed 0); palign-s1 (seed 1)"


def test_seeds_that_evaluated_other_problems_are_not_pooled(tmp_path):
    runs = tmp_path / "runs"
    write_graded_run(runs, "palign-s0", "palign", {"aime24": three_samples(RIGHT_PALIGN)}, seed=0)
    write_graded_run(
        runs,
        "palign-s1",
        "palign",
        {"aime24": three_samples(RIGHT_PALIGN)},
        seed=1,
        ids={"aime24": [f"p{i}" for i in range(29)] + ["other"]},
    )
    rows, notes = pool_seeds(collect_local_runs(runs)[0])
    assert [r.name for r in rows] == ["palign-s0", "palign-s1"]
    assert notes == [
        "not pooled: cannot pool the seeds of palign-s0 and palign-s1 on aime24: they evaluated different "
        "problems (30 and 30 problems; 1 only in palign-s0 (p29); 1 only in palign-s1 (other)); evaluate "
        "both on the same problems"
    ]


def test_an_ablation_compares_each_arm_with_the_recipe_s_own_value(tmp_path):
    runs = tmp_path / "runs"
    step = {"truncation.granularity._target_": "palign.truncation.units.Steps"}
    write_graded_run(runs, "sentence", "palign", {"aime24": three_samples(RIGHT_PALIGN)})
    write_graded_run(runs, "step", "palign", {"aime24": three_samples(RIGHT_LONG)}, set_=step)
    finished, _ = collect_local_runs(runs)
    knob = next(k for k in KNOBS if k.name == "granularity")
    recipe = RunRecord("recipe", base_config() | {"baseline": BASELINES["palign"]}, {}, "config")  # paper_sentence
    table = ablation_table(finished, knob, Report(), 3, recipe)
    body = [
        [c.strip() for c in line.strip("|").split("|")] for line in table.markdown.split("\n\n")[0].splitlines()[2:]
    ]
    delta = {row[3]: row[8:10] for row in body}
    assert delta["paper_sentence"] == ["ref", "ref"] and delta["step"][0].startswith("-33.33 [")
    assert "Reference arms: group 1: paper_sentence (the recipe's own value)." in table.markdown
    assert "Problems each comparison rests on: group 1 step vs paper_sentence: AIME24 30 problems." in table.markdown
    assert [(r.label, r.column) for r in table.forest][:2] == [("step", "AIME24"), ("step", "AIME24")]
    # report.ablation_reference overrides the recipe
    other = ablation_table(finished, knob, Report(ablation_reference={"granularity": "step"}), 3, recipe)
    assert "group 1: step (report.ablation_reference.granularity)" in other.markdown
    # no recipe value among the arms: the first arm, said so
    plain = ablation_table(finished, knob, Report(), 3, None)
    assert "group 1: paper_sentence (the first arm: no arm has a recipe value)" in plain.markdown


def test_make_report_draws_a_forest_plot_per_comparison_on_the_report_page(tmp_path):
    runs = tmp_path / "runs"
    write_graded_run(runs, "long", "sft_long_cot", {"aime24": three_samples(RIGHT_LONG)})
    write_graded_run(runs, "palign", "palign", {"aime24": three_samples(RIGHT_PALIGN)})
    write_graded_run(
        runs,
        "palign-step",
        "palign",
        {"aime24": three_samples(RIGHT_LONG)},
        set_={"truncation.granularity._target_": "palign.truncation.units.Steps"},
    )
    result = _make_table_module().make_report(runs, tmp_path / "report", Report())
    assert_png(result["plots"]["forest_table1"])
    assert_png(result["plots"]["forest_ablation_granularity"])
    page = Path(result["report"]).read_text()
    assert (
        page.index("## table1")
        < page.index("![forest_table1](forest_table1.png)")
        < page.index("## ablation_granularity")
    )
    assert "![forest_ablation_granularity](forest_ablation_granularity.png)" in page
    assert result["intervals"] == {"confidence_level": 0.95, "resamples": 9999, "seed": 0}


# -- the published row -----------------------------------------------------------------------------


def test_the_paper_s_published_row_is_in_palign_s_file_with_its_source():
    rows = load_published()
    paper = rows["paper/qwen2_5_7b_instruct/palign"]
    assert (paper.student, paper.method) == ("qwen2_5_7b_instruct", "palign")
    assert dict(paper.values["pass@1"]) == {
        "aime25": 16.67,
        "aime24": 16.67,
        "amc12": 49.40,
        "math500": 75.80,
        "avg": 39.64,
    }
    assert dict(paper.values["pass@3"]) == {
        "aime25": 26.67,
        "aime24": 26.67,
        "amc12": 63.86,
        "math500": 85.20,
        "avg": 50.60,
    }
    assert "Table 1" in paper.source and "PAPER.md §7.1" in paper.source and "2601.10064" in paper.source
    for metric, values in paper.values.items():  # its Avg is the mean of its printed cells, as in the paper
        assert round(sum(v for b, v in values.items() if b != "avg") / 4 + 1e-9, 2) == values["avg"], metric
    # the paper recipe names it; the default run does not
    recipe = yaml.safe_load(
        (PUBLISHED_FILE.parents[2] / "conf" / "experiment" / "paper" / "table1_qwen2_5_7b.yaml").read_text()
    )
    assert recipe["report"]["published"] == ["paper/qwen2_5_7b_instruct/palign"]


def test_a_published_file_with_a_bad_row_names_the_row_and_field(tmp_path):
    path = tmp_path / "published.yaml"
    path.write_text("mine:\n  source: my paper\n  student: s\n  method: palign\n  pass@1: {aime24: 160}\n")
    with pytest.raises(
        DataFormatError, match=r"published.yaml: row 'mine': field 'pass@1.aime24': expected a percentage"
    ):
        load_published(path)
    path.write_text("mine:\n  student: s\n  method: palign\n  pass@1: {aime24: 16}\n")
    with pytest.raises(DataFormatError, match=r"row 'mine': field 'source' must be a non-empty string"):
        load_published(path)
    with pytest.raises(
        ValueError, match=r"report.published names \['nope'\].*its rows: \['paper/qwen2_5_7b_instruct/palign'\]"
    ):
        select_published(["nope"])


def test_the_verdict_reads_the_published_value_against_the_run_s_interval():
    # 26.67 is 8/30 printed: inside an interval ending at 8/30 exactly
    assert verdict(26.67, 100 / 30, 100 * 8 / 30) == "reproduced"
    assert verdict(26.67, 30.0, 40.0) == "below"  # the run did better
    assert verdict(26.67, 10.0, 20.0) == "above"  # the run did worse
    # printed to two decimals, 26.67 stands for [26.665, 26.675): it reaches an interval from 26.674, not from 26.68
    assert verdict(26.67, 26.674, 40.0) == "reproduced" and verdict(26.67, 26.68, 40.0) == "below"
    assert verdict(26.67, 10.0, 26.666) == "reproduced" and verdict(26.67, 10.0, 26.66) == "above"


def test_the_published_row_stands_beside_its_student_s_run_with_a_verdict_per_cell(tmp_path):
    runs = tmp_path / "runs"
    # AIME24 Pass@3 8/30 = 26.67 (the paper's); AIME25 Pass@3 20/30, far above the paper's 26.67
    write_graded_run(
        runs,
        "palign",
        "palign",
        {"aime24": three_samples([0] * 22 + [1] * 3 + [3] * 5), "aime25": three_samples([0] * 10 + [3] * 20)},
    )
    write_graded_run(runs, "other-student", "palign", {"aime24": three_samples([0] * 30)}, student="qwen3_8b")
    finished, _ = collect_local_runs(runs)
    published = select_published(["paper/qwen2_5_7b_instruct/palign"])
    tables = build_tables(finished, Report(), 3, published)
    rows = md_rows(tables["table1"].markdown)
    assert rows[(STUDENT, "palign [published: paper/qwen2_5_7b_instruct/palign]")][:4] == [
        "16.67",
        "26.67",
        "16.67",
        "26.67",
    ]
    assert ("qwen3_8b", "palign [published: paper/qwen2_5_7b_instruct/palign]") not in rows  # not its student
    reproduction = list(csv.reader(io.StringIO(tables["reproduction"].csv)))
    assert reproduction[0] == ["Published", "Student", "Method", "Run", "Metric", "AIME25", "AIME24", "Avg"]
    verdicts = {r[4]: r[5:] for r in reproduction[1:]}
    # Avg is not compared: the run evaluated two of the published row's four benchmarks
    assert verdicts == {"Pass@1": ["below", "reproduced", ""], "Pass@3": ["below", "reproduced", ""]}
    assert "reproduced: 26.67 vs 26.67 [" in tables["reproduction"].markdown
    assert reproduction_table([r for r in finished if r.student == "qwen3_8b"], published, Report(), 3) is None


def test_a_graded_prediction_file_counts_for_the_benchmark_its_name_names():
    from palign.reporting.tables import benchmark_of_file

    config = {"evaluation": {"benchmarks": {"champ_heldout": {}}}}
    assert benchmark_of_file("../shared/data/reference/palign_qwen25_7b_aime24_outputs.jsonl", config) == "aime24"
    assert benchmark_of_file("data/result/aime25-output.jsonl", config) == "aime25"  # the authors' own name
    assert benchmark_of_file("runs/tiny_champ_heldout_v2.jsonl", config) == "champ_heldout"  # one the config evaluates
    assert benchmark_of_file("runs/tiny_champ_heldout_v2.jsonl", {}) == "tiny_champ_heldout_v2"
    assert benchmark_of_file("aime24_vs_aime25.jsonl", config) == "aime24_vs_aime25"  # two names: the file's own
    assert benchmark_of_file("my_predictions.jsonl", config) == "my_predictions"


@pytest.mark.slow
def test_the_authors_released_aime_outputs_reproduce_the_paper_s_pass_at_3(shared_data, tmp_path):
    """The paper recipe's report on the authors' own outputs (graded with stage=grade): their Pass@3 of
    26.67 on AIME24 and AIME25 (PAPER.md §7.4) lies inside the interval: reproduced."""
    recipe = ["experiment=paper/table1_qwen2_5_7b", "logger=none", "evaluation.grading.workers=2"]
    for benchmark in ("aime24", "aime25"):
        predictions = shared_data / "reference" / f"palign_qwen25_7b_{benchmark}_outputs.jsonl"
        run_cli([*recipe, "stage=grade", f"predictions={predictions}"], tmp_path)
    proc = run_cli([*recipe, "stage=report"], tmp_path)
    rows = md_rows((tmp_path / "report" / "table1.md").read_text())
    graded = rows[("qwen2_5_7b_instruct", "palign (graded predictions)")]
    # AIME25 then AIME24 (the paper's order): Pass@3 8/30 on both
    assert graded[1].startswith("26.67 [") and graded[3].startswith("26.67 [")
    assert ("qwen2_5_7b_instruct", "palign [published: paper/qwen2_5_7b_instruct/palign]") in rows
    reproduction = list(csv.reader(io.StringIO((tmp_path / "report" / "reproduction.csv").read_text())))
    verdicts = {r[4]: dict(zip(reproduction[0][5:], r[5:])) for r in reproduction[1:]}
    assert verdicts["Pass@3"]["AIME24"] == verdicts["Pass@3"]["AIME25"] == "reproduced"
    assert verdicts["Pass@1"]["AIME24"] == verdicts["Pass@1"]["AIME25"] == "reproduced"
    assert verdicts["Pass@3"]["Avg"] == ""  # two of the paper's four benchmarks: no Avg verdict
    assert "| qwen2_5_7b_instruct | palign (graded predictions) | " in proc.stdout  # the report prints Table 1
    # the same graded outputs against a published value they do not reach: above
    report_dir = tmp_path / "again"
    wrong = tmp_path / "published.yaml"
    rows_file = yaml.safe_load(PUBLISHED_FILE.read_text())
    rows_file["paper/qwen2_5_7b_instruct/palign"]["pass@3"]["aime24"] = 60.0
    wrong.write_text(yaml.safe_dump(rows_file))
    result = _make_table_module().make_report(
        tmp_path / "runs",
        report_dir,
        Report(published=["paper/qwen2_5_7b_instruct/palign"], published_file=str(wrong)),
        graded_dir=tmp_path / "grade",
    )
    again = list(csv.reader(io.StringIO(Path(result["tables"]["reproduction"]["csv"]).read_text())))
    assert dict(zip(again[0][5:], again[2][5:]))["AIME24"] == "above"


# -- make_table: the report node composed from overrides -----------------------------------------


def test_make_table_reads_the_report_settings_from_config_overrides(tmp_path):
    runs = tmp_path / "runs"
    write_graded_run(runs, "long", "sft_long_cot", {"aime24": three_samples(RIGHT_LONG)})
    write_graded_run(runs, "palign", "palign", {"aime24": three_samples(RIGHT_PALIGN)})
    result = _make_table_module().main(
        [
            "~local",
            "report.reference=palign",
            "report.intervals.resamples=500",
            "report.intervals.seed=5",
            "--runs-dir",
            str(runs),
            "--graded-dir",
            str(tmp_path / "grade"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    rows = md_rows(result["table1"])
    assert rows[(STUDENT, "palign")][-2:] == ["ref", "ref"] and rows[(STUDENT, "sft_long_cot")][-2].startswith(
        "-33.33 ["
    )
    assert "(scipy.stats.bootstrap, 500 resamples, seed 5)" in result["table1"]
    with pytest.raises(Exception, match=re.escape("report.intervals.resamples")):
        _make_table_module().main(["~local", "report.intervals.resamples=10", "--runs-dir", str(runs)])


# -- W&B, offline: what the run wrote, and the report from it --------------------------------------


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_per_problem_table_the_intervals_and_the_ablation_knob(tmp_path, monkeypatch):
    # the tiny student evaluated as it is (no training: seconds), as one arm of the search ablation
    run_cli(["experiment=tiny", "stage=eval", "logger=wandb", "ablation=search", "group=pytest-ablation"], tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    run = read_offline_run(offline)
    summary = json.loads((run_dir / "summary.json").read_text())["eval"]
    cells = summary["benchmarks"]["champ_heldout"]

    # the ablation's knob and this run's value, under flat keys of the run config
    assert (run.config["ablation.name"], run.config["ablation.knob"], run.config["ablation.value"]) == (
        "search",
        "truncation/search",
        "binary",
    )
    # final values declared with define_metric, so the summary keeps the last value
    for key in (
        "eval/champ_heldout/pass@1",
        "eval/champ_heldout/pass@1_ci_low",
        "eval/champ_heldout/pass@1_ci_high",
        "eval/champ_heldout/pass@2_ci_high",
        "eval/avg_pass@1_ci_low",
    ):
        assert run.metrics[key]["summary"] == ["last"], key
    assert run.summary["eval/champ_heldout/pass@1_ci_low"] == {"last": cells["pass@1_ci_low"]}
    assert run.summary["eval/champ_heldout/pass@1_ci_high"] == {"last": cells["pass@1_ci_high"]}
    assert cells["pass@1_ci_low"] <= cells["pass@1"] <= cells["pass@1_ci_high"] and cells["pass@1_ci_high"] > 0
    assert {"eval/champ_heldout/problems/nrows", "eval/champ_heldout/predictions/nrows"} <= run.history_keys

    graded = [
        json.loads(line) for line in (Path(summary["results"]) / "champ_heldout.graded.jsonl").read_text().splitlines()
    ]
    problems = run.table("eval/champ_heldout/problems")
    assert problems["columns"] == [
        "benchmark",
        "problem",
        "gold",
        "samples",
        "correct samples",
        "sample correct",
        "pass@1",
        "pass@2",
    ]
    assert [row[:6] for row in problems["data"]] == [
        [
            "champ_heldout",
            row["id"],
            row["answer"],
            2,
            sum(row["correct"]),
            "".join("1" if c else "0" for c in row["correct"]),
        ]
        for row in graded
    ]
    predictions = run.table("eval/champ_heldout/predictions")
    assert predictions["columns"][:4] == ["benchmark", "problem", "sample", "gold"]
    assert {(row[1], row[3]) for row in predictions["data"]} == {(row["id"], row["answer"]) for row in graded}
    assert len(predictions["data"]) == 2 * len(graded)

    # the report from the W&B group: W&B's API stood in by what the offline run holds
    class File:
        def __init__(self, path):
            self.path = path

        def download(self, root, replace=False):
            target = Path(root) / self.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(offline / "files" / self.path, target)
            return open(target)

    class Run:
        id, job_type, url = run_dir.name, "eval", f"https://wandb.ai/x/palign/runs/{run_dir.name}"
        summary_metrics, config = run.summary, run.config

        def file(self, path):
            return File(path)

    class Other(Run):
        def __init__(self, job_type):
            self.id, self.job_type, self.summary_metrics = f"{job_type}-run", job_type, {f"{job_type}/pass@1": 1.0}

    class Api:
        def runs(self, path, filters, lazy):
            assert (path, filters) == ("palign", {"group": "pytest-ablation"})
            return [Other("report"), Run(), Other("grade"), Other("train")]

    import wandb

    monkeypatch.setattr(wandb, "Api", Api)
    (from_wandb,), unfinished = collect_wandb_runs("palign", "pytest-ablation")
    (local,), _ = collect_local_runs(tmp_path / "runs")
    assert (
        unfinished == ["train-run"]
        and from_wandb.outcomes()["champ_heldout"].ids == local.outcomes()["champ_heldout"].ids
    )
    assert np.array_equal(
        from_wandb.outcomes()["champ_heldout"].correct[0], local.outcomes()["champ_heldout"].correct[0]
    )
    assert md_rows(table1([from_wandb], Report(), 2).markdown) == md_rows(table1([local], Report(), 2).markdown)
