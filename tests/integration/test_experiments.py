"""Experiments: every recipe runs in fast-dev form, and a sweep over all baselines builds Table 1."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from palign.pipeline import run
from tests.conftest import PROJECT_ROOT, compose_config, run_cli

EXPERIMENTS = sorted(
    str(p.relative_to(PROJECT_ROOT / "conf" / "experiment").with_suffix(""))
    for p in (PROJECT_ROOT / "conf" / "experiment").rglob("*.yaml")
)
ABLATIONS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "ablation").glob("*.yaml"))
# fast-dev: the tiny model on CHAMP and the CPU, whatever the recipe asks for (hub models, s1K, GPUs)
FAST_DEV = [
    "experiment=tiny",
    "teacher=champ",
    "teacher.source.limit=6",
    "trainer=cpu",
    "logger=none",
    "data.val_size=0",
]


def test_recipes_exist():
    assert {"tiny", "paper/table1_qwen2_5_7b", "paper/table1_qwen3_8b"} <= set(EXPERIMENTS)
    assert {
        "granularity",
        "judge_prompt",
        "judge_model",
        "search",
        "decision_mode",
        "fixed_ratio",
        "supervision",
    } <= set(ABLATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_in_fast_dev_form(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", *FAST_DEV], tmp_path)
    assert cfg.student.name == "tiny_random"
    summary = run(cfg)
    assert summary["train"]["complete"] and summary["eval"]["benchmarks"]["champ_heldout"]["num_problems"] == 2


def swept(overrides: list[str], tmp_path) -> list[list[str]]:
    """One override list per job of the sweep that `hydra.sweeper.params` of the composed config asks for."""
    params = compose_config(overrides, tmp_path, hydra=True).hydra.sweeper.params or {}
    jobs = [[]]
    for key, values in params.items():
        jobs = [[*job, f"{key}={value}"] for job in jobs for value in str(values).split(",")]
    return jobs


@pytest.mark.parametrize("recipe", [[], ["experiment=paper/table1_qwen2_5_7b"]], ids=["default", "paper"])
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_job_of_an_ablation_sweep_composes_on_every_recipe_and_keeps_the_recipe(ablation, recipe, tmp_path):
    base = compose_config(recipe, tmp_path)
    jobs = swept([*recipe, f"ablation={ablation}"], tmp_path)
    assert len(jobs) >= 2
    for job in jobs:
        cfg = compose_config([*recipe, f"ablation={ablation}", *job], tmp_path, hydra=True)
        key, value = job[0].split("=", 1)
        chosen = cfg.hydra.runtime.choices.get(key) or OmegaConf.select(cfg, key)
        assert str(chosen) == value, job
        # the recipe's own settings stay: the ablation changes one knob
        assert (cfg.student.name, cfg.teacher.name, cfg.data.max_length, cfg.training.learning_rate) == (
            base.student.name,
            base.teacher.name,
            base.data.max_length,
            base.training.learning_rate,
        )
        assert cfg.group == f"ablation-{ablation}-{base.student.name}"


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablation_runs_in_fast_dev_form(ablation, tmp_path):
    (job, *_) = swept([f"ablation={ablation}"], tmp_path)
    summary = run(compose_config([f"ablation={ablation}", *job, *FAST_DEV], tmp_path))
    assert summary["train"]["complete"] and summary["eval"]["benchmarks"]["champ_heldout"]["num_problems"] == 2


@pytest.mark.slow
def test_sweep_over_all_baselines_builds_a_complete_table_and_reruns_do_no_new_work(tmp_path):
    baselines = "palign,fixed_ratio,sft_long_cot,sft_short_cot,prefix_only,student_only"
    args = ["-m", *FAST_DEV, f"baseline={baselines}", "group=pytest-table"]
    first = run_cli(args, tmp_path)
    assert "sweep finished: 6 of 6 jobs succeeded" in first.stdout
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 6
    # what each stage stored: checkpoints, students, predictions, and the cached truncation,
    # alignment and tokenized records (the test's own cache, so the first sweep computed them all)
    stored = [p for run_dir in runs for p in run_dir.rglob("*") if p.suffix in (".ckpt", ".safetensors")]
    stored += [
        p for run_dir in runs for p in (run_dir / "eval").glob("*/*.jsonl") if not p.name.endswith(".graded.jsonl")
    ]
    stored += [
        p
        for p in (tmp_path / "cache").rglob("*")
        if p.is_file() and "models" not in p.relative_to(tmp_path / "cache").parts
    ]
    assert {p.relative_to(tmp_path / "cache").parts[0] for p in stored if tmp_path / "cache" in p.parents} >= {
        "truncation",
        "alignment",
        "tokenized",
    }
    stamps = {p: p.stat().st_mtime_ns for p in stored}
    stages = {
        run_dir: {
            k: v
            for k, v in json.loads((run_dir / "summary.json").read_text()).items()
            if k in ("truncation", "alignment")
        }
        for run_dir in runs
    }
    report = run_cli(["stage=report", "logger=none"], tmp_path)
    table = (tmp_path / "report" / "table1.md").read_text()
    main_table = table.split("\n\n")[0]  # Table 1 itself; the samples-per-cell table follows
    rows = [line for line in main_table.splitlines() if line.startswith("| tiny_random |")]
    assert sorted(line.split("|")[2].strip() for line in rows) == sorted(baselines.split(","))
    assert all("–" not in line for line in rows), table  # no empty cell
    assert "Pass@2" in table and "| tiny_random | palign |" in report.stdout
    # the same sweep again: every job finds its finished run and its cached stages
    second = run_cli(args, tmp_path)
    assert "sweep finished: 6 of 6 jobs succeeded" in second.stdout
    assert sorted((tmp_path / "runs").iterdir()) == runs
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp, f"{path} was rewritten"
    for run_dir in runs:  # finished training is skipped whole: its stage summaries are the first sweep's
        summary = json.loads((run_dir / "summary.json").read_text())
        assert {k: v for k, v in summary.items() if k in ("truncation", "alignment")} == stages[run_dir]
        assert summary["eval"]["benchmarks"]["champ_heldout"]["num_problems"] == 2


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep_and_is_reported(tmp_path):
    proc = run_cli(
        ["-m", *FAST_DEV, "baseline=sft_long_cot,sft_short_cot", "data.max_length=16,768"], tmp_path, check=False
    )
    assert proc.returncode == 1
    assert "sweep finished: 2 of 4 jobs succeeded" in proc.stdout
    assert proc.stdout.count("[failed]") == 2 and "longer than data.max_length=16 tokens" in proc.stdout
    finished = [d for d in (tmp_path / "runs").iterdir() if (d / "student" / "config.json").exists()]
    assert len(finished) == 2
