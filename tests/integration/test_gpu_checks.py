"""The GPU check scripts (experiments/gpu/) run in their shrunk form on the CPU, so the script a GPU
session runs once is known to work before its minutes start."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT, cli_env


def test_training_check_runs_shrunk_and_reports_a_reloadable_lora_export(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.gpu.check_training", "--shrink", "--steps", "2", "--out", str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["steps"] == 2 and len(report["loss_curve"]) == 2
    assert report["loss_kernel"] == "chunked"  # Liger is CUDA only
    assert 0 < report["trainable"] < report["parameters"]  # LoRA: only the adapters train
    assert report["tokens_per_s"] > 0 and report["export_reloads"] is True
    assert report["model_tflops_per_s"] > 0 and report["mfu"] is None  # a CPU has no peak to compare with


def test_inference_check_runs_shrunk_the_one_pass_judge_against_its_floor(tmp_path, cache_dir):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.gpu.check_inference",
            "--shrink",
            "--cache",
            str(cache_dir),
            "--out",
            str(out),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["prefixes_scored"] > 10 and report["trace_tokens"] > 400  # every prefix of the trace, judged
    assert report["judge_over_floor"] > 0 and report["generated_tokens_per_s_batch4"] > 0


# -- experiments/gpu/acceptance.sh: the three checks in one command and one table ------------------
def smollm2_tokenizer_dir(cache_dir) -> str:
    """The session's converted SmolLM2 folder: the tokenizer files a GPU machine gets from the bundle."""
    from omegaconf import OmegaConf

    from palign.llm.models import resolve_model_path

    return resolve_model_path(OmegaConf.load(PROJECT_ROOT / "conf" / "student" / "smollm2_135m.yaml"), cache_dir)


def acceptance(args: list[str], tmp_path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`bash experiments/gpu/acceptance.sh --no-install ARGS` with this Python's packages (no bundle, no
    network), HOME and TMPDIR under tmp_path."""
    env = cli_env(tmp_path, {"PYTHON": sys.executable})
    return subprocess.run(
        ["bash", str(PROJECT_ROOT / "experiments" / "gpu" / "acceptance.sh"), "--no-install", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_acceptance_runs_every_step_shrunk_and_prints_one_passing_table(tmp_path, cache_dir):
    out = tmp_path / "acceptance"
    proc = acceptance(["--shrink", "--tokenizer", smollm2_tokenizer_dir(cache_dir), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\| (pipeline|training|inference) \| (\S+) \|", proc.stdout, re.MULTILINE)
    assert rows == [("pipeline", "pass"), ("training", "pass"), ("inference", "pass")]
    assert "acceptance: 3 of 3 steps passed" in proc.stdout
    assert (out / "acceptance.md").read_text().strip() in proc.stdout

    steps = json.loads((out / "acceptance.json").read_text())["steps"]
    pipeline = steps["pipeline"]["report"]  # the run's summary.json: every stage ran, on the CPU
    assert pipeline["train"]["complete"] and pipeline["train"]["global_step"] > 0
    assert (
        pipeline["truncation"]["examples"] == 12 and pipeline["alignment"]["examples"] == 12
    )  # the written teacher file
    assert pipeline["eval"]["benchmarks"]["acceptance"]["num_problems"] == 2
    assert {where["device"] for where in pipeline["inference_placement"].values()} == {"cpu"}
    assert steps["training"]["report"]["export_reloads"] is True and steps["training"]["report"]["steps"] == 2
    assert steps["inference"]["report"]["prefixes_scored"] > 10
    for name in ("pipeline", "training", "inference"):  # each step's output is kept beside the table
        assert (out / f"{name}.log").stat().st_size > 0


def test_acceptance_fails_with_the_table_when_a_step_cannot_run(tmp_path, cache_dir):
    """A step the deadline leaves no time for fails in the table, and the command exits non-zero."""
    out = tmp_path / "acceptance"
    proc = acceptance(
        [
            "--shrink",
            "--tokenizer",
            smollm2_tokenizer_dir(cache_dir),
            "--out",
            str(out),
            "--steps",
            "inference",
            "--deadline-s",
            "1",
        ],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^\| inference \| FAIL: not run: the 1 s deadline was spent \|", proc.stdout, re.MULTILINE)
    assert "acceptance: 0 of 1 steps passed (failed: inference)" in proc.stdout


def test_acceptance_refuses_a_missing_tokenizer_naming_how_to_make_one(tmp_path):
    proc = acceptance(
        ["--shrink", "--tokenizer", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")], tmp_path, timeout=120
    )
    assert proc.returncode == 2
    assert "no tokenizer at" in proc.stderr and "experiments/gpu/fetch_wheels.sh" in proc.stderr


def test_acceptance_data_is_worked_arithmetic_with_the_answer_boxed_and_held_out_problems(tmp_path):
    sys.path.insert(0, str(PROJECT_ROOT))
    from experiments.gpu.acceptance import write_acceptance_data

    paths = write_acceptance_data(tmp_path)
    teacher = [json.loads(line) for line in paths["teacher"].read_text().splitlines()]
    benchmark = [json.loads(line) for line in paths["benchmark"].read_text().splitlines()]
    assert len(teacher) == 12 and len(benchmark) == 4
    assert (
        teacher[0]["question"] == "What is the sum of the whole numbers from 1 to 5?" and teacher[0]["answer"] == "15"
    )
    assert teacher[1]["question"].startswith("What is the value of 6!") and teacher[1]["answer"] == "720"
    for row in teacher:  # the trace ends on its own answer, and every sentence is one unit of work
        assert row["long_cot"].endswith(f"\\boxed{{{row['answer']}}}.")
        assert row["long_cot"].count(". ") >= 4
    assert not {r["question"] for r in teacher} & {r["problem"] for r in benchmark}
    assert len({r["id"] for r in teacher + benchmark}) == 16
