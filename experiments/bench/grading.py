"""Benchmark of answer grading (evaluation stage): in-process vs `GradingPool` with 1 and 2 workers.

Grades the 180 samples of the authors' released Qwen2.5-7B P-ALIGN outputs on AIME24 and AIME25
(30 problems x 3 samples each, up to ~160k characters per sample) and prints samples/s, the ratio
to serial in-process grading, and peak resident memory of this process and of its (finished)
worker processes. "cold" includes spawning the workers; "warm" is the best of the repeats on the
already-started pool. Also checks that every configuration gives Pass@3 = 26.67 on both files.

Run from the repository root:  python -m experiments.bench.grading [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from palign.grading import GradingPool

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "reference"
FILES = [REFERENCE / f"palign_qwen25_7b_{name}_outputs.jsonl" for name in ("aime24", "aime25")]


def load_pairs() -> list[tuple[str, str]]:
    pairs = []
    for path in FILES:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                pairs += [(output, record["answer"]) for output in record["output"]]
    return pairs


def peak_rss_mib() -> tuple[float, float]:
    """(this process, largest finished child) peak RSS in MiB; Linux reports ru_maxrss in KiB."""
    to_mib = 1 / 1024
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mib,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mib,
    )


def pass_at_3_counts(correct: list[bool]) -> list[int]:
    per_problem = [correct[i : i + 3] for i in range(0, len(correct), 3)]
    return [sum(any(p) for p in per_problem[:30]), sum(any(p) for p in per_problem[30:])]


def run(num_workers: int, pairs: list[tuple[str, str]], repeats: int) -> tuple[float, float, list[int]]:
    """(cold seconds, best warm seconds, Pass@3 counts) for one configuration."""
    with GradingPool(num_workers=num_workers, timeout_s=10.0) as pool:
        start = time.perf_counter()
        results = pool.grade(pairs)
        cold = time.perf_counter() - start
        warm = []
        for _ in range(repeats):
            start = time.perf_counter()
            pool.grade(pairs)
            warm.append(time.perf_counter() - start)
        if pool.num_timeouts:
            print(f"  warning: {pool.num_timeouts} timeouts", file=sys.stderr)
    return cold, min(warm) if warm else cold, pass_at_3_counts([r.correct for r in results])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm repeats per configuration")
    args = parser.parse_args()
    missing = [str(p) for p in FILES if not p.exists()]
    if missing:
        sys.exit(f"reference outputs not found: {missing} (needs ../shared/data next to the repo)")
    pairs = load_pairs()
    chars = sum(len(output) for output, _ in pairs)
    print(f"{len(pairs)} samples, {chars / 1e6:.1f} M characters, repeats={args.repeats}")
    print(
        f"{'configuration':<24}{'cold s':>8}{'cold/s':>9}{'warm s':>8}{'warm/s':>9}{'x serial':>10}"
        f"{'RSS self':>10}{'RSS child':>11}  pass@3 (aime24, aime25)"
    )
    baseline = None
    configurations = (("in-process serial", 0), ("GradingPool 1 worker", 1), ("GradingPool 2 workers", 2))
    for label, workers in configurations:
        cold, warm, counts = run(workers, pairs, args.repeats)
        baseline = baseline or warm
        rss_self, rss_child = peak_rss_mib()
        print(
            f"{label:<24}{cold:>8.2f}{len(pairs) / cold:>9.1f}{warm:>8.2f}{len(pairs) / warm:>9.1f}"
            f"{baseline / warm:>10.2f}{rss_self:>9.0f}M{rss_child:>10.0f}M"
            f"  {counts[0]}/30, {counts[1]}/30"
        )


if __name__ == "__main__":
    main()
