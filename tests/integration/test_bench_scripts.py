"""The benchmark scripts stay runnable: each imports and parses its arguments (the runs themselves
take minutes on SmolLM2 and are reported in experiments/README.md, not asserted here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

BENCHES = sorted(p.stem for p in (PROJECT_ROOT / "experiments" / "bench").glob("*.py") if p.stem != "__init__")


def test_every_issue_benchmark_exists():
    assert {"truncation", "sft", "grading", "generation"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_benchmark_script_imports_and_parses_arguments(name):
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.bench.{name}", "--help"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout
