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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct out of `n` samples: 1 - C(n-c,k)/C(n,k).

    Computed as `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, which avoids huge binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(
            f"need 1 <= k <= n, got n={n}, k={k}: cannot estimate pass@{k} from {n} samples"
        )
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _check_correct_matrix(correct: Tensor) -> Tensor:
    if correct.ndim != 2:
        raise ValueError(
            "expected a [num_problems, n_samples] matrix of correctness, "
            f"got shape {tuple(correct.shape)}"
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
