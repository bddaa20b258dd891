"""End to end through Hydra and Lightning with the tiny model: train, export, evaluate, resume, sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import PROJECT_ROOT, TEST_CACHE, compose_config, run_cli
from palign.pipeline import run

FAST = ["debug=fast", "logger=csv"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs").iterdir() if p.is_dir())


def test_fast_end_to_end_trains_exports_and_grades(tmp_path):
    cfg = compose_config([*FAST, "baseline=sft_short_cot"], tmp_path)
    summary = run(cfg)
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.name.startswith("tiny_random-sft_short_cot-champ-")
    assert summary["train"]["complete"] and summary["train"]["global_step"] == 5  # 10 examples / batch 2
    assert len(summary["train"]["loss_curve"]) == 5
    assert all(v == v for v in summary["train"]["loss_curve"])  # no NaN
    assert summary["data"]["train/examples"] == 10 and summary["data"]["val/examples"] == 2
    # the exported student loads with plain transformers and differs from the initial weights
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    from palign.llm.models import load_model

    initial = load_model(cfg.student, TEST_CACHE)
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    (graded,) = list((run_dir / "eval").glob("*/champ_heldout.graded.jsonl"))
    rows = [json.loads(line) for line in graded.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["correct"]) == 2 and len(r["output"]) == 2 for r in rows)
    # held out: the evaluated CHAMP problems are none of the problems the run trained on
    from palign.pipeline import training_records

    assert not {r["id"] for r in rows} & {r.id for r in training_records(cfg)}
    held_out = summary["eval"]["benchmarks"]["champ_heldout"]
    assert held_out["num_problems"] == 2 and held_out["num_samples"] == 2 and held_out["max_new_tokens"] == 8
    assert "| tiny_random | sft_short_cot |" in (run_dir / "results.md").read_text()
    assert (run_dir / "results.csv").read_text().startswith("Student,Method,CHAMP_HELDOUT Pass@1,CHAMP_HELDOUT Pass@2")
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss_epoch" in metrics and "train/tokens_per_s" in metrics
    # the same config again is the same run folder, and finished training is not repeated
    again = run(compose_config([*FAST, "baseline=sft_short_cot"], tmp_path))
    assert run_dirs(tmp_path) == [run_dir]
    assert again["train"] == summary["train"]


def test_rerun_after_a_kill_resumes_from_last_checkpoint(tmp_path):
    args = [*FAST, "teacher.source.limit=40", "data.train_limit=null", "data.val_size=0", "data.micro_batch_size=1",
            "training.effective_batch_size=1", "stage=train"]
    env = {**os.environ, "PALIGN_OUTPUTS": str(tmp_path), "PALIGN_CACHE": str(TEST_CACHE)}
    proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "run.py"), *args], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    last = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs").glob("*/checkpoints/last.ckpt")) if (tmp_path / "runs").exists() else []
        if found:
            state = torch.load(found[0], map_location="cpu", weights_only=False)
            if state["global_step"] >= 3:
                last = found[0]
                os.killpg(proc.pid, signal.SIGKILL)  # a hard crash: no cleanup, no final save
                break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert last is not None, "training never wrote a checkpoint before finishing or timing out"
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert not (last.parent.parent / "summary.json").exists() or "train" not in json.loads((last.parent.parent / "summary.json").read_text())
    run_cli(args, tmp_path)
    summary = json.loads((last.parent.parent / "summary.json").read_text())
    total = summary["data"]["train/examples"]  # batch 1, one epoch: one optimizer step per example
    assert 3 <= killed_at < total
    assert summary["train"]["resumed_from"] == str(last)
    assert summary["train"]["global_step"] == total
    # one loss per optimizer step across both processes: nothing redone, nothing missing
    assert len(summary["train"]["loss_curve"]) == total


def test_multirun_writes_one_offline_wandb_run_per_job(tmp_path):
    proc = run_cli(["-m", "debug=fast", "logger=wandb", "baseline=sft_long_cot,sft_short_cot", "group=pytest-sweep"], tmp_path)
    dirs = run_dirs(tmp_path)
    assert [d.name.split("-champ-")[0] for d in dirs] == ["tiny_random-sft_long_cot", "tiny_random-sft_short_cot"]
    for run_dir in dirs:
        (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
        assert offline.name.endswith(run_dir.name)  # the W&B id is the run id: reruns resume, never duplicate
        assert list(offline.glob("run-*.wandb"))
        history = _wandb_history_keys(next(offline.glob("run-*.wandb")))
        assert {"train/loss", "train/tokens_per_s", "trainer/global_step", "train/perplexity",
                "val/loss_epoch", "eval/champ_heldout/pass@1", "eval/avg_pass@2", "eval/champ_heldout/predictions/nrows"} <= history
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["train"]["complete"] and "champ_heldout" in summary["eval"]["benchmarks"]
    assert proc.returncode == 0


def _wandb_history_keys(path: Path) -> set[str]:
    """Keys of the history and summary records in a W&B transaction log (`run-<id>.wandb`).

    The file is a 7-byte W&B header followed by a LevelDB-style log: 32 KiB blocks of chunks,
    each with a 7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle,
    4 last); every full record is a serialized `wandb_internal_pb2.Record`.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, keys = 32768, 7, b"", set()
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = payload
        elif kind in (3, 4):
            pending += payload
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        kind_name = record.WhichOneof("record_type")
        if kind_name == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind_name == "summary":
            keys.update(item.key or "/".join(item.nested_key) for item in record.summary.update)
    return keys
