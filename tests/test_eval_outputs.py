"""Evaluation outputs are named by the evaluation's settings: a second `stage=eval` with other
sampling, benchmarks or pass@k keeps the first's results.md and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose_config
from palign.pipeline import run

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

    more_samples = run(compose_config([*FAST, "stage=eval", "evaluation.sampling.num_samples=3", "evaluation.pass_k=3"], tmp_path))
    fewer_problems = run(compose_config([*FAST, "stage=eval", "evaluation.benchmarks.champ_heldout.limit=1"], tmp_path))
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]  # all three evaluated the same trained run
    second, third = (Path(s["eval"]["results"]) for s in (more_samples, fewer_problems))
    assert len({first, second, third}) == 3
    assert outputs(first) == first_outputs  # untouched by the later evaluations
    # other sampling: other predictions; the same sampling on fewer problems: the same predictions, reused
    assert second.parent != first.parent and third.parent == first.parent
    assert (first.parent / "champ_heldout.jsonl").read_text() == predictions

    metrics = [json.loads((f / "metrics.json").read_text())["champ_heldout"] for f in (first, second, third)]
    graded = [[json.loads(line) for line in (f / "champ_heldout.graded.jsonl").read_text().splitlines()] for f in (first, second, third)]
    assert [(len(rows), len(rows[0]["correct"])) for rows in graded] == [(2, 2), (2, 3), (1, 2)]  # each its own grades
    assert [(m["num_problems"], m["num_samples"]) for m in metrics] == [(2, 2), (2, 3), (1, 2)]
    assert "CHAMP_HELDOUT Pass@3" in (second / "results.csv").read_text().splitlines()[0]
    settings = json.loads((third / "evaluation.json").read_text())
    assert settings["pass_k"] == 2 and settings["benchmarks"]["champ_heldout"]["limit"] == 1
    assert settings["predictions"]["sampling"]["num_samples"] == 2
    assert outputs(run_dir) == outputs(third) and fewer_problems["eval"]["benchmarks"]["champ_heldout"]["num_problems"] == 1

    # the first setting again: its own folder, same results, and the latest copy is it again
    again = run(compose_config([*FAST, "stage=eval"], tmp_path))
    assert Path(again["eval"]["results"]) == first
    assert outputs(first) == first_outputs == outputs(run_dir)
