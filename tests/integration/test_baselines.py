"""Every baseline runs end to end (truncate -> align -> train -> eval) with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palign.pipeline import run
from tests.conftest import PROJECT_ROOT, compose_config, run_cli

BASELINES = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "baseline").glob("*.yaml"))
SMALL = ["experiment=tiny", "logger=none", "teacher.source.limit=8", "data.val_size=0"]


def test_the_baseline_group_is_complete():
    assert set(BASELINES) == {"palign", "fixed_ratio", "sft_long_cot", "sft_short_cot", "prefix_only", "student_only"}


@pytest.mark.slow
@pytest.mark.parametrize("baseline", BASELINES)
def test_baseline_end_to_end(baseline, tmp_path):
    summary = run(compose_config([*SMALL, f"baseline={baseline}"], tmp_path))
    data = summary["data"]
    assert summary["train"]["complete"] and data["train/examples"] >= 6
    if baseline in ("sft_long_cot", "sft_short_cot", "prefix_only"):  # no filter: every problem is used or counted
        assert data["train/examples"] + data["train/dropped_too_long"] == 8
    assert summary["eval"]["benchmarks"]["champ_heldout"]["num_problems"] == 2
    truncates = baseline in ("palign", "fixed_ratio", "prefix_only")
    assert ("truncation" in summary) == truncates
    assert ("alignment" in summary) == (baseline in ("palign", "fixed_ratio", "student_only"))
    if baseline == "fixed_ratio":
        assert summary["truncation"]["judge_calls_per_example"] == 0
        assert summary["truncation"]["prefix_ratio_mean"] >= 0.5


@pytest.mark.slow
def test_stage_grade_reproduces_the_papers_pass_at_3_on_the_authors_outputs(tmp_path, shared_data):
    for name in ("aime24", "aime25"):
        path = shared_data / "reference" / f"palign_qwen25_7b_{name}_outputs.jsonl"
        proc = run_cli(["stage=grade", f"predictions={path}", "logger=none"], tmp_path)
        assert "pass@3 = 26.67" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_stage_truncate_then_train_reuses_the_truncation(tmp_path):
    # the test's own cache (compose_config: only the converted models in it), so the first run really computes
    args = [*SMALL, "baseline=prefix_only", "truncation/search=exhaustive"]
    first = run(compose_config([*args, "stage=truncate"], tmp_path))
    assert first["truncation"]["judge_calls_this_run"] > 0
    second = run(compose_config(args, tmp_path))
    assert second["truncation"]["judge_calls_this_run"] == 0  # computed once, reused by the training run
    assert second["truncation"]["artifact"] == first["truncation"]["artifact"]
    stored = json.loads((Path(first["truncation"]["artifact"]) / "records.jsonl").read_text().splitlines()[0])
    assert stored["monotone"] in (True, False) and len(stored["probes"]) == stored["m"]
