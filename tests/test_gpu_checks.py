"""The GPU check scripts (experiments/gpu/) run in their shrunk form on the CPU, so the script a GPU
session runs once is known to work before its minutes start."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import PROJECT_ROOT


def test_training_check_runs_shrunk_and_reports_a_reloadable_lora_export(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu.check_training", "--shrink", "--steps", "2",
                           "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["steps"] == 2 and len(report["loss_curve"]) == 2
    assert 0 < report["trainable"] < report["parameters"]  # LoRA: only the adapters train
    assert report["tokens_per_s"] > 0 and report["export_reloads"] is True
    assert report["model_tflops_per_s"] > 0 and report["mfu"] is None  # a CPU has no peak to compare with


def test_inference_check_runs_shrunk_the_one_pass_judge_against_its_floor(tmp_path, cache_dir):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu.check_inference", "--shrink", "--cache", str(cache_dir),
                           "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["prefixes_scored"] > 10 and report["trace_tokens"] > 400  # every prefix of the trace, judged
    assert report["judge_over_floor"] > 0 and report["generated_tokens_per_s_batch4"] > 0
