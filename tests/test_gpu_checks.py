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
