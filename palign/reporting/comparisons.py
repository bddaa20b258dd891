"""Comparisons a researcher can trust: per-problem outcomes of a table row, seeds pooled into one
row, and paired differences between two rows with an interval and a p-value.

A row's cells rest on its per-problem outcomes (`Outcomes`: the problem ids and each run's
`[problems, samples]` correctness, read from the graded predictions or a W&B per-problem table).
Cell intervals come from palign/evaluation/metrics.py (BCa bootstrap over problems, Wilson at the
edges, MOVER for Avg: its docstring says why).

* Seeds: runs that differ in their seed alone are one setting. Their row's cell is the mean over
  seeds; its interval is the bootstrap over problems of each problem's score averaged over the
  seeds (the same mean), and the spread over seeds (their standard deviation) is shown beside it.
* Paired differences: two rows are compared on the problems both evaluated, problem by problem
  (the same problem is easy or hard for both runs, so pairing removes the problem-to-problem
  spread from the comparison). The difference of the means is the mean of the per-problem
  differences d_i; its interval is the BCa bootstrap over problems of d (`scipy.stats.bootstrap`)
  and its p-value the paired permutation test (`scipy.stats.permutation_test`, sign flips of d_i:
  under "no difference" each problem's two scores are exchangeable), exact when 2^N <= resamples.
  Where every d_i is the same (both runs all wrong: d = 0 everywhere) the bootstrap has no spread;
  the interval is then Newcombe's square-and-add of the two rows' own intervals (MOVER without
  the correlation term: conservative), so it does not collapse to a point either.
* Avg difference: the mean of the benchmarks' differences, its interval by MOVER over the
  benchmarks' difference intervals (independent problem sets), its p-value by the same sign-flip
  test on all problems at once, each weighted 1 / (B x its benchmark's problems) so the statistic
  is exactly the Avg difference (a stratified permutation test).
* A difference is marked when its interval excludes 0 and the permutation test agrees
  (p < 1 - confidence level): with a handful of problems a bootstrap interval is too narrow, while
  the exact permutation test is not.
* Refusal: two runs that evaluated different problems, or drew a different number of samples per
  problem, are not compared (nor pooled): `IncomparableRuns` names both runs and what differs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from palign.evaluation.metrics import (
    Interval,
    bootstrap_interval,
    mean_interval,
    mover_sum,
    on_a_grid,
    problem_scores,
    seeded,
)
from palign.schema import Intervals


class IncomparableRuns(ValueError):
    """Two runs that cannot be compared or pooled: the message names them and what differs."""


@dataclass(frozen=True)
class Outcomes:
    """One benchmark's per-sample correctness behind one table row: the problem ids, and one
    `[problems, samples]` matrix per run pooled into the row (one per seed), rows in `ids` order."""

    benchmark: str
    ids: tuple[str, ...]
    correct: tuple[np.ndarray, ...] = field(repr=False)
    runs: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return int(self.correct[0].shape[1])

    @property
    def label(self) -> str:
        return " + ".join(self.runs)

    def scores(self, metric: str) -> np.ndarray:
        """Each problem's score (in [0, 1]) averaged over the pooled runs."""
        return np.mean([problem_scores(matrix, metric) for matrix in self.correct], axis=0)

    def value(self, metric: str) -> float:
        """The cell, in percent."""
        return 100.0 * float(self.scores(metric).mean())

    def interval(self, metric: str, settings: Intervals) -> Interval:
        """The cell's interval, in percent."""
        return mean_interval(self.scores(metric), settings).scaled(100.0)

    def aligned(self, ids: Sequence[str]) -> Outcomes:
        """The same outcomes with the problems in the order of `ids` (the same set)."""
        position = {pid: i for i, pid in enumerate(self.ids)}
        order = [position[pid] for pid in ids]
        return Outcomes(self.benchmark, tuple(ids), tuple(m[order] for m in self.correct), self.runs)


def outcomes_from_rows(
    benchmark: str, run: str, rows: Iterable[tuple[str, Sequence[bool]]], where: str | os.PathLike
) -> Outcomes:
    """One run's outcomes from `(problem id, per-sample correctness)` rows read at `where` (a graded
    file or a W&B table), which must give every problem the same number of samples, each id once."""
    ids: list[str] = []
    matrix: list[list[bool]] = []
    for problem, correct in rows:
        if matrix and len(correct) != len(matrix[0]):
            raise IncomparableRuns(
                f"{where}: problem {problem} has {len(correct)} graded samples, problem {ids[0]} "
                f"{len(matrix[0])}; pass@k needs the same number for every problem"
            )
        ids.append(str(problem))
        matrix.append([bool(c) for c in correct])
    if not ids or not matrix[0]:
        raise IncomparableRuns(f"{where}: no graded samples for {benchmark}")
    if len(set(ids)) != len(ids):
        repeated = sorted({pid for pid in ids if ids.count(pid) > 1})
        raise IncomparableRuns(f"{where}: problem id(s) {', '.join(repeated[:5])} appear more than once on {benchmark}")
    return Outcomes(benchmark, tuple(ids), (np.array(matrix, dtype=bool),), (run,))


def check_comparable(a: Outcomes, b: Outcomes, doing: str) -> None:
    """Refuse (IncomparableRuns) two rows that evaluated other problems or drew other sample counts."""
    if set(a.ids) != set(b.ids):
        only_a, only_b = sorted(set(a.ids) - set(b.ids)), sorted(set(b.ids) - set(a.ids))
        detail = "; ".join(
            f"{len(only)} only in {who} ({', '.join(only[:5])}{', ...' if len(only) > 5 else ''})"
            for only, who in ((only_a, a.label), (only_b, b.label))
            if only
        )
        raise IncomparableRuns(
            f"cannot {doing} {a.label} and {b.label} on {a.benchmark}: they evaluated different problems "
            f"({len(a.ids)} and {len(b.ids)} problems; {detail}); evaluate both on the same problems"
        )
    if a.num_samples != b.num_samples:
        raise IncomparableRuns(
            f"cannot {doing} {a.label} and {b.label} on {a.benchmark}: they drew different numbers of "
            f"samples per problem ({a.num_samples} and {b.num_samples}); evaluate both with the same "
            "evaluation.sampling.num_samples"
        )


def pool(outcomes: Sequence[Outcomes]) -> Outcomes:
    """The outcomes of runs that differ in their seed alone, as one row (refused when they evaluated
    different problems or sample counts)."""
    first = outcomes[0]
    for other in outcomes[1:]:
        check_comparable(first, other, "pool the seeds of")
    aligned = [first] + [other.aligned(first.ids) for other in outcomes[1:]]
    return Outcomes(
        first.benchmark,
        first.ids,
        tuple(m for o in aligned for m in o.correct),
        tuple(run for o in aligned for run in o.runs),
    )


@dataclass(frozen=True)
class Difference:
    """A row minus its reference on one benchmark (or Avg), in percentage points."""

    delta: float
    interval: Interval
    p_value: float
    problems: int
    """How many problems the comparison rests on (summed over benchmarks for Avg)."""
    marked: bool
    """The interval excludes 0 and p < 1 - confidence level (see the module docstring)."""


def _sign_flip_p(d: np.ndarray, weights: np.ndarray, settings: Intervals) -> float:
    """Two-sided p-value of the paired permutation test of `sum(weights * d)`: each d_i's sign flipped."""
    from scipy import stats

    if not np.any(d):
        return 1.0
    d = on_a_grid(d)[0]  # whole numbers: the null distribution's ties with the observed statistic are exact

    def statistic(x, axis):
        return np.moveaxis(x, axis, -1) @ weights

    result = stats.permutation_test(
        (d,),
        statistic,
        permutation_type="samples",
        vectorized=True,
        n_resamples=settings.resamples,
        **seeded(stats.permutation_test, settings.seed),
    )
    return float(min(1.0, result.pvalue))


def _marked(interval: Interval, p_value: float, settings: Intervals) -> bool:
    return interval.excludes(0.0) and p_value < 1.0 - settings.confidence_level


def paired_difference(row: Outcomes, reference: Outcomes, metric: str, settings: Intervals) -> Difference:
    """`row` minus `reference` on their shared benchmark, problem by problem (module docstring);
    IncomparableRuns when they evaluated other problems or sample counts."""
    check_comparable(row, reference, "compare")
    reference = reference.aligned(row.ids)
    a, b = row.scores(metric), reference.scores(metric)
    d = a - b
    if np.all(
        on_a_grid(d)[0] == on_a_grid(d)[0][0]
    ):  # no spread to bootstrap: Newcombe's square-and-add of the two rows' intervals
        ia, ib = mean_interval(a, settings), mean_interval(b, settings)
        interval = mover_sum([float(a.mean()), -float(b.mean())], [ia, Interval(-ib.high, -ib.low, ib.method)])
    else:
        interval = bootstrap_interval(d, settings)
    p_value = _sign_flip_p(d, np.full(d.size, 1.0 / d.size), settings)
    interval = interval.scaled(100.0)
    return Difference(100.0 * float(d.mean()), interval, p_value, d.size, _marked(interval, p_value, settings))


def average_difference(
    rows: Sequence[Outcomes], references: Sequence[Outcomes], metric: str, settings: Intervals
) -> Difference:
    """The Avg column's difference: benchmark by benchmark (the same benchmarks, in order), combined
    by MOVER and tested with the stratified sign-flip test (module docstring)."""
    if [o.benchmark for o in rows] != [o.benchmark for o in references] or not rows:
        raise IncomparableRuns(
            f"cannot compare the Avg of {rows[0].label if rows else '?'} and "
            f"{references[0].label if references else '?'}: they evaluated different benchmarks "
            f"({', '.join(o.benchmark for o in rows)} and {', '.join(o.benchmark for o in references)})"
        )
    differences = [paired_difference(row, ref, metric, settings) for row, ref in zip(rows, references)]
    count = len(differences)
    interval = mover_sum([d.delta for d in differences], [d.interval for d in differences], 1.0 / count)
    d = np.concatenate([row.scores(metric) - ref.aligned(row.ids).scores(metric) for row, ref in zip(rows, references)])
    weights = np.concatenate([np.full(len(row.ids), 1.0 / (count * len(row.ids))) for row in rows])
    p_value = _sign_flip_p(d, weights, settings)
    delta = sum(diff.delta for diff in differences) / count
    return Difference(delta, interval, p_value, int(d.size), _marked(interval, p_value, settings))
