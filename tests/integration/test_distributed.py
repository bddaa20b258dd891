"""Training and caching with several processes: DDP with 2 processes on the CPU (gloo,
`trainer=ddp_sim`), and several processes sharing one stage cache.

Claims tested: every rank trains on a disjoint shard and the shards together are the epoch;
the effective batch is micro batch x accumulation x world size, read from the running trainer, and
an unreachable one is refused naming the keys; a DDP job killed with SIGKILL anywhere and rerun
ends with the weights of an uninterrupted DDP run; export, evaluation, the summary and W&B happen
once, on rank 0; processes sharing a cache compute each record once.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from palign.data.sampling import ResumableShuffleSampler, ShardedEvalBatches
from palign.pipeline import accumulation_steps
from palign.schema import ConfigError
from tests.conftest import PROJECT_ROOT, cli_command, cli_env, run_cli, run_cli_killed
from tests.test_pipeline import _wandb_history_keys

DDP = ["experiment=tiny", "trainer=ddp_sim", "trainer.precision=32-true", "baseline=sft_long_cot"]
PROBE = "+callbacks.probe._target_=tests.helpers.ddp_probe.RecordBatches"
TESTS_ON_PATH = {"PYTHONPATH": str(PROJECT_ROOT)}


# -- sharding -----------------------------------------------------------------------------------
@given(
    n=st.integers(1, 60),
    batch=st.integers(1, 5),
    replicas=st.integers(1, 4),
    epoch=st.integers(0, 3),
    grouped=st.booleans(),
    seed=st.integers(0, 5),
)
def test_rank_shards_are_disjoint_cover_the_epoch_and_keep_batches_aligned(n, batch, replicas, epoch, grouped, seed):
    lengths = [(i * 37) % 101 + 1 for i in range(n)]
    samplers = [
        ResumableShuffleSampler(
            n,
            seed=seed,
            lengths=lengths if grouped else None,
            batch_size=batch,
            group_size=batch * 4 if grouped else 0,
            num_replicas=replicas,
            rank=r,
        )
        for r in range(replicas)
    ]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    shards = [list(s) for s in samplers]
    seen = Counter(i for shard in shards for i in shard)
    assert set(seen) == set(range(n))  # together, the whole epoch
    padded = samplers[0].padded_items
    assert sum(seen.values()) == n + padded and padded < replicas * batch  # repeats only to fill the last round
    # every rank runs the same number of micro-batches (or the all-reduce would hang), all full but
    # possibly its last one, so the DataLoader's batch boundaries are the sampler's micro-batches
    assert len({-(-len(shard) // batch) for shard in shards}) == 1
    assert [len(s) for s in samplers] == [len(shard) for shard in shards]
    global_batches = [samplers[0].order(epoch)[i : i + batch] for i in range(0, n, batch)]
    for rank, shard in enumerate(shards):
        own = [shard[i : i + batch] for i in range(0, len(shard), batch)]
        assert own[: len(global_batches[rank::replicas])] == global_batches[rank::replicas]  # length groups kept
    if replicas == 1:
        assert shards[0] == samplers[0].order(epoch)  # one process: the order it always had


def test_a_resumed_rank_skips_exactly_what_it_trained():
    sampler = ResumableShuffleSampler(23, seed=1, batch_size=2, num_replicas=2, rank=1)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.resume(epoch=1, items_done=6)
    assert list(sampler) == full[6:]


# -- batch math ---------------------------------------------------------------------------------
def test_effective_batch_counts_every_process_of_every_node():
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        num_nodes=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert trainer.world_size == 4
    assert accumulation_steps(32, 1, trainer.world_size) == 8
    assert accumulation_steps(32, 2, 16) == 1  # the paper recipe on 2 nodes x 8 GPUs
    with pytest.raises(ConfigError, match=r"training.effective_batch_size=32 .* data.micro_batch_size=3 x 4 processes"):
        accumulation_steps(32, 3, trainer.world_size)


@pytest.mark.slow
def test_an_unreachable_effective_batch_is_refused_before_any_stage_runs(tmp_path):
    proc = run_cli([*DDP, "logger=none", "stage=train", "training.effective_batch_size=2"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "training.effective_batch_size=2 is not a multiple of data.micro_batch_size=2 x 2 processes" in proc.stderr
    assert not list((tmp_path / "cache").glob("tokenized/*"))  # refused before tokenizing anything


# -- a DDP job, end to end ----------------------------------------------------------------------
def _run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    return run_dir


@pytest.mark.slow
def test_ddp_job_shards_the_epoch_and_does_rank_zero_duties_once(tmp_path):
    probe = tmp_path / "probe"
    args = [
        *DDP,
        "logger=wandb",
        "training.effective_batch_size=4",
        "data.micro_batch_size=1",
        "stage=all",
        PROBE,
        f"+callbacks.probe.folder={probe}",
    ]
    proc = run_cli(args, tmp_path, env=TESTS_ON_PATH)
    run_dir = _run_dir(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    train = summary["train"]
    assert train["world_size"] == 2 and train["accumulate_grad_batches"] == 2  # 4 = 1 x 2 x 2
    assert summary["inference_placement"]["evaluation"] == {"device": "cpu", "dtype": "float32"}

    dataset = json.loads((probe / "dataset.json").read_text())
    ranks = [[json.loads(line) for line in (probe / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])  # the same number of micro-batches: no rank waits at the all-reduce
    rows = [row for batches in ranks for batch in batches for row in batch["rows"]]
    padded = len(rows) - len(dataset)
    assert set(rows) == set(dataset) and 0 <= padded < 2  # disjoint shards making up the epoch
    shards = [{row for batch in batches for row in batch["rows"]} for batches in ranks]
    assert len(shards[0] & shards[1]) == padded
    steps = -(-len(ranks[0]) // 2)
    assert train["global_step"] == steps  # accumulation of 2 micro-batches per rank per optimizer step

    # rank 0 alone exported, evaluated, wrote the summary and the one W&B run
    assert (run_dir / "student" / "config.json").exists()
    (predictions,) = (run_dir / "eval").rglob("champ_heldout.jsonl")
    ids = [json.loads(line)["id"] for line in predictions.read_text().splitlines()]
    assert ids and len(ids) == len(set(ids))  # each problem once
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # one W&B run, the trainer's and the evaluation's
    history = _wandb_history_keys(next(offline.glob("run-*.wandb")))
    assert {"train/loss", "eval/champ_heldout/pass@1"} <= history
    assert proc.stdout.count(f"run {run_dir.name}") == 1  # one summary printed


@pytest.mark.slow
def test_a_ddp_job_killed_anywhere_and_rerun_trains_exactly_what_an_uninterrupted_one_does(tmp_path):
    from safetensors.torch import load_file

    # 15 problems, 2 for validation: 13 examples, 1 per micro-batch on each of 2 ranks, accumulated
    # over 2 micro-batches (effective batch 4): 7 micro-batches per rank per epoch, 4 optimizer steps.
    # The paper's LoRA: its dropout draws random numbers on each rank, and a resume must restore
    # each rank's own stream.
    args = [
        *DDP,
        "logger=none",
        "teacher.source.limit=15",
        "data.val_size=2",
        "data.micro_batch_size=1",
        "data.max_length=2048",
        "training.effective_batch_size=4",
        "training.epochs=2",
        "stage=train",
        "training=paper",
        "training.gradient_checkpointing=false",
        "training.checkpoint_every_n_steps=1",
    ]
    run_cli(args, tmp_path / "straight")
    straight = _run_dir(tmp_path / "straight")
    expected = json.loads((straight / "summary.json").read_text())["train"]
    assert expected["global_step"] == 8

    crashed = tmp_path / "crashed"
    for hook, step, micro in (
        ("on_train_batch_end", 1, 0),  # mid accumulation, epoch 1
        ("on_train_batch_start", 6, 1),
    ):  # mid accumulation, epoch 2
        kill = [
            "+callbacks.crash._target_=tests.helpers.crash.KillAt",
            f"+callbacks.crash.hook={hook}",
            f"+callbacks.crash.step={step}",
            f"+callbacks.crash.micro={micro}",
            "+callbacks.crash.whole_job=true",
        ]
        run_cli_killed([*args, *kill], crashed, TESTS_ON_PATH)
        assert not (_run_dir(crashed) / "student").exists()
    run_cli(args, crashed)
    resumed = json.loads((_run_dir(crashed) / "summary.json").read_text())["train"]
    assert resumed["resumed_from"] is not None
    for key in ("global_step", "loss_curve", "tokens_seen"):
        assert resumed[key] == expected[key], key
    want, got = (load_file(run / "student" / "model.safetensors") for run in (straight, _run_dir(crashed)))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# -- validation ---------------------------------------------------------------------------------
@given(n=st.integers(0, 40), batch=st.integers(1, 5), replicas=st.integers(1, 4))
def test_validation_shards_are_disjoint_in_order_and_evened_out_with_empty_batches(n, batch, replicas):
    shards = [ShardedEvalBatches(n, batch, num_replicas=replicas, rank=r).batches for r in range(replicas)]
    assert len({len(shard) for shard in shards}) == 1  # every rank runs the same number of forwards
    real = [b for shard in shards for b in shard if b]
    assert sorted(i for b in real for i in b) == list(range(n))  # disjoint, together the split
    assert sorted(real) == [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]  # its micro-batches
    for shard in shards:  # at most one filler per rank, after its real batches
        assert shard.count([]) <= 1 and shard == [b for b in shard if b] + [[]] * shard.count([])
    if replicas == 1:
        assert shards[0] == [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]


@pytest.mark.slow
def test_ddp_validation_is_sharded_and_its_reduced_loss_is_the_single_process_loss(tmp_path):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from tests.conftest import stage_cache

    probe = tmp_path / "probe"
    args = [
        *DDP,
        "logger=none",
        "stage=train",
        "teacher.source.limit=15",
        "data.val_size=5",
        "data.max_length=2048",
        "data.micro_batch_size=2",
        "training.effective_batch_size=4",
        "+callbacks.val._target_=tests.helpers.rank_probes.RecordValidation",
        f"+callbacks.val.folder={probe}",
    ]
    run_cli(args, tmp_path, env=TESTS_ON_PATH)
    run_dir = _run_dir(tmp_path)
    dataset = json.loads((probe / "val_dataset.json").read_text())
    batches = -(-len(dataset) // 2)
    assert batches % 2 == 1  # the setup: 2 ranks cannot split the micro-batches evenly
    ranks = [[json.loads(line) for line in (probe / f"val_rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == (batches + 1) // 2  # the same number of forwards (FSDP needs it)
    shards = [[row for b in lines if b["supervised"] for row in b["rows"]] for lines in ranks]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])  # disjoint
    assert sorted(shards[0] + shards[1]) == sorted(dataset)  # together the split, each example once
    fillers = [b for lines in ranks for b in lines if not b["supervised"]]
    assert len(fillers) == 1  # the shorter shard evened out by one batch that weighs nothing

    # the reduced loss is the token-weighted loss of the whole split under the final weights, in one process
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    (val_data,) = (stage_cache(tmp_path) / "tokenized").glob("val-*/data")
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in load_from_disk(str(val_data)):
            labels = torch.tensor(row["labels"][1:])
            logits = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits.double(), labels, reduction="sum"))
            tokens += int((labels != -100).sum())
    reduced = json.loads((run_dir / "summary.json").read_text())["train"]["metrics"]["val/loss_epoch"]
    assert reduced == pytest.approx(nll / tokens, rel=1e-5)


# -- processes sharing one cache ----------------------------------------------------------------
@pytest.mark.slow
def test_processes_sharing_a_cache_compute_each_record_once(tmp_path):
    """Two jobs (as two SLURM tasks on two nodes would) run stages 1 and 2 at once on one cache: one
    computes each stage, the other waits on the stage's lock and reads its records."""
    args = ["experiment=tiny", "logger=none", "baseline=palign", "stage=align"]
    env = cli_env(tmp_path)
    jobs = [
        subprocess.Popen(
            cli_command(args), cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    logs = [job.communicate(timeout=900)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert sum("examples to compute" in log for log in logs) == 1  # truncation computed by one job only
    for store in (tmp_path / "cache").rglob("records.jsonl"):
        keys = [json.loads(line)["key"] for line in store.read_text().splitlines()]
        assert keys and len(keys) == len(set(keys)), store  # no record written twice
    summaries = [
        json.loads((run / "summary.json").read_text()) for run in (tmp_path / "runs").iterdir() if run.is_dir()
    ]
    assert len(summaries) == 1  # both jobs are the same run


def test_strategies_whose_processes_do_not_report_back_are_refused():
    from palign.pipeline import check_launcher

    for strategy in ("ddp_spawn", "ddp_fork", "ddp_notebook"):
        with pytest.raises(ConfigError, match=rf"trainer.strategy={strategy}: .* use trainer.strategy=ddp"):
            check_launcher(strategy)
    for strategy in ("ddp", "fsdp", "auto"):
        check_launcher(strategy)
