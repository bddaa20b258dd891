"""Pass@k metrics for Table 1 (paper §3 "Metrics", §7.1, §7.4).

The paper samples n = 3 solutions per problem and reports Pass@1 and Pass@3. Pass@3 is "at least
one of the 3 samples is correct", which is what the unbiased estimator
`1 - C(n-c, k) / C(n, k)` (Chen et al., 2021) gives for k = n. Pass@1 is ambiguous in the
authors' code (§9.17: `pass_at_1` is never defined), so two readings are kept apart:

* `MeanSampleAccuracy`: mean correctness over all samples (the unbiased pass@1; the authors'
  printed "acc@3");
* `FirstSampleAccuracy`: correctness of the first sample only (a single-sample run).

Every metric is a `torchmetrics.Metric` whose states are sums (`dist_reduce_fx="sum"`), so
problems graded on different DDP ranks combine exactly. Updates take a boolean matrix
`correct[num_problems, n_samples]`.

Intervals (the report's cells and the evaluation's W&B summary; settings: palign/schema.py:
Intervals). AIME has 30 problems: one problem is 3.3 points, so every cell carries an interval.

* A benchmark's cell: the BCa bootstrap over problems (`scipy.stats.bootstrap`, Efron's
  bias-corrected and accelerated percentile interval, scipy's default) of the mean of the
  per-problem scores. The problem is the unit resampled: the benchmark's problems are the sample
  drawn from a population of problems, while the samples of one problem are not independent of
  each other (the same problem, the same model). They are not resampled within a problem, which
  the issue that asked for intervals suggested where n > 1: drawing a problem's n samples with
  replacement repeats samples, which pulls Pass@n down (a problem with 1 of 3 samples correct
  keeps one in 1 - (2/3)^3 = 70% of redraws) and counts the within-problem variance twice
  (Davison & Hinkley 1997, Bootstrap Methods, §3.8: resample the first stage only); the spread of
  the per-problem scores already holds it.
* All wrong or all right: where every problem scores the same, the bootstrap has no spread and
  would give a point. There the interval is Wilson's score interval over the problems
  (`scipy.stats.binomtest(...).proportion_ci(method="wilson")`): 0 of 30 problems right is
  [0, 11.4]%, not [0, 0]. It counts problems, not samples (conservative: the samples of one
  problem are correlated). Wilson rather than Clopper-Pearson because its coverage is closer to
  nominal at small n (Brown, Cai & DasGupta 2001); rather than a Bayesian bootstrap, because a
  Bayesian bootstrap of all-zero scores is zero too.
* Exact ties: per-problem scores are fractions with small denominators (c of n samples), so many
  resampled means equal the estimate; BCa counts those ties, and a float sum in another order would
  count them differently. Scores are resampled as whole numbers over their common denominator
  (`on_a_grid`), so the same outcomes always give the same interval, whatever arithmetic made them.
* Avg (the mean over benchmarks, which are independent samples of problems): MOVER, the method of
  variance estimates recovery (Zou & Donner 2008; Newcombe 2011), which adds the benchmarks'
  interval arms in quadrature: `mean -/+ sqrt(sum(arm_b^2)) / B`. One benchmark gives its own
  interval; an edge benchmark brings its Wilson arms, so Avg never collapses either.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from palign.schema import Intervals


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct out of `n` samples: 1 - C(n-c,k)/C(n,k).

    Computed as `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, which avoids huge binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}: cannot estimate pass@{k} from {n} samples")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _check_correct_matrix(correct: Tensor) -> Tensor:
    if correct.ndim != 2:
        raise ValueError(
            f"expected a [num_problems, n_samples] matrix of correctness, got shape {tuple(correct.shape)}"
        )
    if correct.shape[1] == 0:
        raise ValueError("every problem needs at least one sample (got n_samples = 0)")
    return correct.bool()


class _MeanOverProblems(Metric):
    """Mean over problems of a per-problem score; subclasses define `_per_problem`."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_problem(self, correct: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, correct: Tensor) -> None:
        correct = _check_correct_matrix(correct)
        self.score_sum += self._per_problem(correct).to(torch.float64).sum().to(self.score_sum.device)
        self.num_problems += correct.shape[0]

    def compute(self) -> Tensor:
        return self.score_sum / self.num_problems


class PassAtK(_MeanOverProblems):
    """Mean over problems of the unbiased pass@k estimator (a fraction in [0, 1])."""

    def __init__(self, k: int, **kwargs):
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def _per_problem(self, correct: Tensor) -> Tensor:
        n = correct.shape[1]
        counts = correct.sum(dim=1).tolist()
        return torch.tensor([pass_at_k(n, int(c), self.k) for c in counts], dtype=torch.float64)


class MeanSampleAccuracy(_MeanOverProblems):
    """Pass@1 (mean over samples): per-problem fraction of correct samples, averaged."""

    def _per_problem(self, correct: Tensor) -> Tensor:
        return correct.to(torch.float64).mean(dim=1)


class FirstSampleAccuracy(_MeanOverProblems):
    """Pass@1 (first sample): whether sample 0 of each problem is correct, averaged."""

    def _per_problem(self, correct: Tensor) -> Tensor:
        return correct[:, 0].to(torch.float64)


def summarize_correctness(correct_matrix: Tensor | Sequence[Sequence[bool]]) -> dict[str, float]:
    """Table-1 numbers (percent) from a `[num_problems, n_samples]` correctness matrix.

    Keys: `pass@1` (mean over samples), `pass@1_first` (first sample), `pass@{n}` (any sample
    correct, which is the unbiased pass@n), `num_problems`, `num_samples` (n).
    """
    correct = _check_correct_matrix(torch.as_tensor(correct_matrix, dtype=torch.bool))
    if correct.shape[0] == 0:
        raise ValueError("cannot summarise an empty correctness matrix (0 problems)")
    num_problems, n = correct.shape
    summary: dict[str, float] = {}
    for key, metric in (
        ("pass@1", MeanSampleAccuracy()),
        ("pass@1_first", FirstSampleAccuracy()),
        (f"pass@{n}", PassAtK(n)),
    ):
        metric.update(correct)
        summary[key] = 100.0 * float(metric.compute())
    summary["num_problems"] = num_problems
    summary["num_samples"] = n
    return summary


# ---------------------------------------------------------------------------------------------
# Per-problem scores and intervals (see the module docstring for the choice of methods)

_PASS_AT = re.compile(r"pass@(\d+)")


def problem_scores(correct: np.ndarray | Sequence[Sequence[bool]], metric: str) -> np.ndarray:
    """Each problem's score in [0, 1] from a `[num_problems, n_samples]` correctness matrix: the mean
    over problems is the benchmark's cell. `metric`: pass@1 (mean over samples), pass@1_first (the
    first sample), or pass@k (the unbiased estimator, k <= n)."""
    correct = _check_correct_matrix(torch.as_tensor(np.asarray(correct, dtype=bool))).numpy()
    if metric == "pass@1_first":
        return correct[:, 0].astype(float)
    match = _PASS_AT.fullmatch(metric)
    if match is None:
        raise ValueError(f"unknown metric '{metric}': expected pass@1, pass@1_first or pass@<k>")
    k, n = int(match.group(1)), correct.shape[1]
    if k == 1:
        return correct.mean(axis=1)
    return np.array([pass_at_k(n, int(c), k) for c in correct.sum(axis=1)], dtype=float)


@dataclass(frozen=True)
class Interval:
    """A confidence interval, in the unit of its estimate, and the method that gave it."""

    low: float
    high: float
    method: str
    """bca (bootstrap over problems), percentile (where BCa cannot be computed), wilson (every problem
    scored the same), mover (an Avg, or a difference at the edges)."""

    def scaled(self, factor: float) -> Interval:
        return Interval(self.low * factor, self.high * factor, self.method)

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high


def mean_interval(scores: np.ndarray | Sequence[float], settings: Intervals) -> Interval:
    """The interval of the mean of per-problem scores in [0, 1]: BCa bootstrap over problems, or
    Wilson's over problems where every problem scored the same (module docstring)."""
    from scipy import stats

    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"expected a non-empty vector of per-problem scores, got shape {scores.shape}")
    grid, _ = on_a_grid(scores)
    if np.all(grid == grid[0]):
        # all wrong or all right (or every problem the same share of its samples, rounded to whole problems)
        ci = stats.binomtest(round(float(scores[0]) * scores.size), scores.size).proportion_ci(
            confidence_level=settings.confidence_level, method="wilson"
        )
        return Interval(float(ci.low), float(ci.high), "wilson")
    return bootstrap_interval(scores, settings)


def on_a_grid(values: np.ndarray) -> tuple[np.ndarray, int]:
    """`values` as whole numbers over their common denominator, and that denominator (1 when they have
    none below a million). Per-problem scores are fractions with small denominators (c/n, pass@k's
    C(n,k), averaged over seeds); on whole numbers every bootstrap mean is exact, so the ties BCa
    counts (resampled means equal to the estimate) do not depend on the order of a float sum."""
    from fractions import Fraction

    scale = 1
    for value in values:
        scale = math.lcm(scale, Fraction(float(value)).limit_denominator(10_000).denominator)
        if scale > 1_000_000:
            return values, 1
    grid = np.round(values * scale)
    return (grid, scale) if np.allclose(grid / scale, values, rtol=0, atol=1e-9) else (values, 1)


def bootstrap_interval(values: np.ndarray, settings: Intervals) -> Interval:
    """scipy's BCa interval of the mean of `values`; the percentile interval where BCa is undefined."""
    import warnings

    from scipy import stats

    values, scale = on_a_grid(np.asarray(values, dtype=float))
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's own warning when it cannot be computed: the fallback follows
            result = stats.bootstrap(
                (values,),
                np.mean,
                n_resamples=settings.resamples,
                vectorized=True,
                confidence_level=settings.confidence_level,
                method=method,
                **seeded(stats.bootstrap, settings.seed),
            )
        low, high = (float(v) / scale for v in result.confidence_interval)
        if math.isfinite(low) and math.isfinite(high):
            return Interval(low, high, method.lower())
    raise ValueError(f"no bootstrap interval for {values.size} values")  # percentile is always finite


def seeded(function, seed: int) -> dict:
    """The seed argument of a scipy resampling function: `rng` since scipy 1.15, `random_state` before."""
    import inspect

    name = "rng" if "rng" in inspect.signature(function).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def mover_sum(estimates: Sequence[float], intervals: Sequence[Interval], scale: float = 1.0) -> Interval:
    """The interval of `scale * sum(estimates)` of independent estimates from their intervals, by
    MOVER (Zou & Donner 2008): the arms below and above each estimate added in quadrature. The Avg
    over B benchmarks is `scale = 1 / B`."""
    if len(estimates) != len(intervals) or not estimates:
        raise ValueError("one interval per estimate, at least one")
    below = math.sqrt(sum((e - i.low) ** 2 for e, i in zip(estimates, intervals)))
    above = math.sqrt(sum((i.high - e) ** 2 for e, i in zip(estimates, intervals)))
    total = sum(estimates)
    return Interval(scale * (total - below), scale * (total + above), "mover")


def cell_intervals(
    correct: np.ndarray | Sequence[Sequence[bool]], metrics: Sequence[str], settings: Intervals
) -> dict[str, Interval]:
    """Each metric's interval for one benchmark's correctness matrix, in percent (as the cells)."""
    return {metric: mean_interval(problem_scores(correct, metric), settings).scaled(100.0) for metric in metrics}
