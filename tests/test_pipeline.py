"""End to end through Hydra and Lightning with the tiny model: train, export, evaluate, resume, sweep."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from palign.pipeline import run
from tests.conftest import PROJECT_ROOT, cli_command, cli_env, compose_config, run_cli

FAST = ["experiment=tiny", "logger=csv"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs").iterdir() if p.is_dir())


@pytest.mark.slow
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

    initial = load_model(cfg.student, cfg.paths.cache_dir)
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    (graded,) = list((run_dir / "eval").glob("*/champ_heldout.graded.jsonl"))
    rows = [json.loads(line) for line in graded.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["correct"]) == 2 and len(r["output"]) == 2 for r in rows)
    # held out: the evaluated CHAMP problems are none of the teacher's, so none the run trained on, whatever the seed
    from palign.pipeline import teacher_ids, training_records

    other_seed = compose_config([*FAST, "baseline=sft_short_cot", "seed=1"], tmp_path)
    assert teacher_ids(other_seed) == teacher_ids(cfg)  # runs of two seeds evaluate the same problems
    trained_on = {r.id for r in training_records(cfg)} | {r.id for r in training_records(other_seed)}
    assert trained_on <= set(teacher_ids(cfg)) and not {r["id"] for r in rows} & set(teacher_ids(cfg))
    held_out = summary["eval"]["benchmarks"]["champ_heldout"]
    assert held_out["num_problems"] == 2 and held_out["num_samples"] == 2 and held_out["max_new_tokens"] == 8
    assert "| tiny_random | sft_short_cot |" in (run_dir / "results.md").read_text()
    assert (run_dir / "results.csv").read_text().startswith("Student,Method,CHAMP_HELDOUT Pass@1,CHAMP_HELDOUT Pass@2")
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss_epoch" in metrics and "train/tokens_per_s" in metrics
    # the same config again is the same run folder, and finished training is not repeated
    again = run(compose_config([*FAST, "baseline=sft_short_cot"], tmp_path))
    assert run_dirs(tmp_path) == [run_dir]
    assert again["train"] == summary["train"]
    # the rerun logs to a folder of its own: the first invocation's metrics are kept
    assert (run_dir / "csv" / "version_0" / "metrics.csv").read_text() == metrics
    assert (run_dir / "csv" / "version_1" / "metrics.csv").exists()


# 15 problems, 2 for validation: 13 training examples in micro-batches of 2, accumulated to 4, so
# each epoch is 7 micro-batches and 4 optimizer steps, the last one a single example. fp32 on CPU.
RESUME = [
    *FAST,
    "baseline=sft_long_cot",
    "teacher.source.limit=15",
    "data.val_size=2",
    "data.micro_batch_size=2",
    "data.max_length=2048",
    "training.effective_batch_size=4",
    "training.epochs=2",
    "trainer.precision=32-true",
    "stage=train",
]
# Where each process of the interrupted run dies (SIGKILL from inside, at a point chosen exactly;
# WRITE: killed by the kernel halfway through writing a checkpoint, tests/helpers/kill_mid_write.py):
WRITE = "checkpoint write"
KILLS = [
    ("on_train_batch_end", 1, 0),  # step 2, after its first micro-batch: mid gradient accumulation
    (WRITE, 2, None),  # halfway through writing the checkpoint of step 2 (last.ckpt is step 1's)
    ("on_save_checkpoint", 3, None),  # while the checkpoint of step 3 is being built (last.ckpt is step 2's)
    ("on_train_epoch_end", 4, None),  # end of epoch 1, before its checkpoint (resumes from step 3)
    ("on_train_batch_start", 4, 0),  # first batch of epoch 2 (resumes from epoch 1's end)
    ("on_train_batch_start", 6, 0),  # epoch 2, just after step 6 was checkpointed (resumes mid-epoch 2)
]


def _run_dir(run_root: Path) -> Path:
    (run_dir,) = run_dirs(run_root)
    return run_dir


def _trained(run_root: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    run_dir = _run_dir(run_root)
    return json.loads((run_dir / "summary.json").read_text()), load_file(run_dir / "student" / "model.safetensors")


@pytest.mark.slow
def test_a_run_killed_anywhere_and_resumed_trains_exactly_what_an_uninterrupted_run_does(tmp_path):
    run_cli(RESUME, tmp_path / "straight")
    straight, straight_weights = _trained(tmp_path / "straight")
    assert straight["train"]["global_step"] == 8 and straight["train"]["resumed_from"] is None

    crashed = tmp_path / "crashed"
    env = {"PYTHONPATH": str(PROJECT_ROOT)}
    half_a_checkpoint = (_run_dir(tmp_path / "straight") / "checkpoints" / "last.ckpt").stat().st_size // 2
    for hook, step, micro in KILLS:
        if hook == WRITE:
            command = cli_command(RESUME)
            command[1:2] = [str(PROJECT_ROOT / "tests" / "helpers" / "kill_mid_write.py"), str(half_a_checkpoint)]
            proc = subprocess.run(command, cwd=PROJECT_ROOT, env=cli_env(crashed, env), capture_output=True, text=True)
            assert proc.returncode == -signal.SIGXFSZ, f"the checkpoint write was not cut:\n{proc.stderr[-3000:]}"
        else:
            kill = [
                "+callbacks.crash._target_=tests.helpers.crash.KillAt",
                f"+callbacks.crash.hook={hook}",
                f"+callbacks.crash.step={step}",
            ]
            kill += [f"+callbacks.crash.micro={micro}"] if micro is not None else []
            proc = run_cli([*RESUME, *kill], crashed, env=env, check=False)
            assert proc.returncode == -signal.SIGKILL, (
                f"{hook} at step {step} did not crash the run:\n{proc.stderr[-3000:]}"
            )
        run_dir = _run_dir(crashed)
        summary = run_dir / "summary.json"
        assert not summary.exists() or "train" not in json.loads(summary.read_text())
        checkpoints = run_dir / "checkpoints"
        left = [(p.name, p.stat().st_size) for p in checkpoints.glob("last.ckpt.tmp-*")]
        if hook == WRITE:  # the killed writer's half file; the previous checkpoint whole
            assert len(left) == 1 and 0 < left[0][1] <= half_a_checkpoint, left
            assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == step - 1
        else:  # a run removes what a killed writer left when it starts (and this one was killed before any)
            assert left == [], left
    run_cli(RESUME, crashed)
    resumed, resumed_weights = _trained(crashed)

    assert resumed["train"]["resumed_from"] is not None
    for key in ("global_step", "loss_curve", "tokens_seen"):
        assert resumed["train"][key] == straight["train"][key], key  # per-step losses equal to the last bit
    assert resumed_weights.keys() == straight_weights.keys()
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)
    # the summary's figures too, the last epoch's (resumed mid-epoch) included; only the speed differs
    timed = ("train/tokens_per_s",)
    assert {k: v for k, v in resumed["train"]["metrics"].items() if k not in timed} == {
        k: v for k, v in straight["train"]["metrics"].items() if k not in timed
    }
    assert {"train/loss_epoch", "train/perplexity", "train/token_accuracy", "val/loss_epoch"} <= set(
        resumed["train"]["metrics"]
    )


@pytest.mark.slow
def test_two_uninterrupted_runs_give_bit_identical_students(tmp_path):
    args = [*FAST, "baseline=sft_long_cot", "trainer.precision=32-true", "stage=train"]
    first = run(compose_config(args, tmp_path / "one"))
    second = run(compose_config(args, tmp_path / "two"))
    assert first["train"]["loss_curve"] == second["train"]["loss_curve"]
    weights = [_trained(root)[1] for root in (tmp_path / "one", tmp_path / "two")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_multirun_writes_one_offline_wandb_run_per_job(tmp_path):
    proc = run_cli(
        ["-m", "experiment=tiny", "logger=wandb", "baseline=sft_long_cot,sft_short_cot", "group=pytest-sweep"], tmp_path
    )
    dirs = run_dirs(tmp_path)
    assert [d.name.split("-champ-")[0] for d in dirs] == ["tiny_random-sft_long_cot", "tiny_random-sft_short_cot"]
    for run_dir in dirs:
        (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
        assert offline.name.endswith(run_dir.name)  # the W&B id is the run id: reruns resume, never duplicate
        assert list(offline.glob("run-*.wandb"))
        history = _wandb_history_keys(next(offline.glob("run-*.wandb")))
        assert {
            "train/loss",
            "train/tokens_per_s",
            "trainer/global_step",
            "train/perplexity",
            "val/loss_epoch",
            "eval/champ_heldout/pass@1",
            "eval/avg_pass@2",
            "eval/champ_heldout/predictions/nrows",
        } <= history
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["train"]["complete"] and "champ_heldout" in summary["eval"]["benchmarks"]
    assert proc.returncode == 0


def _wandb_history_keys(path: Path) -> set[str]:
    """Keys of the history and summary records in a W&B transaction log (`run-<id>.wandb`)."""
    from tests.helpers.wandb_log import records

    keys: set[str] = set()
    for record in records(path):
        kind_name = record.WhichOneof("record_type")
        if kind_name == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind_name == "summary":
            keys.update(item.key or "/".join(item.nested_key) for item in record.summary.update)
    return keys
