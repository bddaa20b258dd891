"""Hydra launchers through hydra-submitit-launcher: `hydra/launcher=submitit_local` runs a real multirun,
and `hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) writes the sbatch script the paper recipe needs.

No SLURM here: the SLURM tests put a fake `srun` (it only has to exist, so submitit sees a cluster) and a
fake `sbatch` (it keeps the script it is given and refuses it, so nothing waits for a queue) first on PATH.
Everything up to that call is the real thing: Hydra composes, instantiates the plugin's launcher, and
submitit writes the script from the launcher's parameters.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from hydra.errors import ConfigCompositionException

from tests.conftest import compose_config, run_cli

# a developer's conf/local/slurm.yaml (partition, account) stays out of a test, like conf/local/default.yaml
NO_LOCAL_SLURM = "~local@hydra.launcher"
PAPER_ON_TWO_NODES = [
    "-m",
    "hydra/launcher=slurm",
    "experiment=paper/table1_qwen2_5_7b",
    "trainer=ddp",
    "trainer.num_nodes=2",
    "trainer.devices=8",
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_a_submitit_local_multirun_runs_each_job_as_a_submitit_job_with_its_own_result(tmp_path):
    # stage=grade: the cheapest stage that goes through the pipeline; each file has a known pass@1
    half = write_jsonl(tmp_path / "half.jsonl", [{"id": "h1", "answer": "2", "output": ["\\boxed{2}", "\\boxed{3}"]}])
    full = write_jsonl(tmp_path / "full.jsonl", [{"id": "f1", "answer": "3", "output": ["\\boxed{3}", "\\boxed{3}"]}])
    proc = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "stage=grade",
            f"predictions={half},{full}",
            "logger=none",
            "evaluation.grading.workers=1",
        ],
        tmp_path,
    )
    assert "sweep finished: 2 of 2 jobs succeeded" in proc.stdout, proc.stdout[-2000:]

    (sweep,) = tmp_path.glob("multirun/*/*")
    jobs = [json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()]
    assert sorted((job["num"], job["status"]) for job in jobs) == [(0, "ok"), (1, "ok")]
    # submitit ran two jobs, each logged and pickled its result under the sweep's .submitit/<job id>/
    submitted = sorted(p for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
    assert len(submitted) == 2
    logs = {}
    for folder in submitted:
        assert (folder / f"{folder.name}_0_result.pkl").is_file()
        logs[folder.name] = (folder / f"{folder.name}_0_log.out").read_text()
    for path, pass_at_1 in ((half, 50.0), (full, 100.0)):
        (graded,) = tmp_path.glob(f"grade/*/{path.stem}.graded.jsonl")
        summary = json.loads((graded.parent / "summary.json").read_text())
        assert summary["graded"][str(path)]["pass@1"] == pytest.approx(pass_at_1)
        # the job that graded this file says so in its own submitit log, and only there
        assert sum(f"per-sample grades written to {graded}" in log for log in logs.values()) == 1


# -- SLURM: the sbatch script --------------------------------------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH for run_cli with a fake srun and sbatch first; the script sbatch was given lands in `submitted`."""
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\necho "sbatch: error: stopped by the test" >&2\nexit 1\n'
    )
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, bin_dir / "submitted.sh"


def submit(args, tmp_path, fake_slurm) -> str:
    """What sbatch was given for `python run.py <args>`."""
    env, submitted = fake_slurm
    proc = run_cli(args, tmp_path, env=env, check=False)
    assert proc.returncode != 0 and "stopped by the test" in proc.stderr, proc.stderr[-3000:]
    return submitted.read_text()


def sbatch_flags(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, flags=re.M))


@pytest.mark.slow
def test_the_slurm_launcher_asks_for_the_trainers_nodes_and_gpus_with_one_task_per_gpu(tmp_path, fake_slurm):
    script = submit([*PAPER_ON_TWO_NODES, NO_LOCAL_SLURM], tmp_path, fake_slurm)
    flags = sbatch_flags(script)
    assert (flags["nodes"], flags["gpus-per-node"], flags["ntasks-per-node"]) == ("2", "8", "8")
    assert (flags["time"], flags["cpus-per-task"], flags["mem"]) == ("1440", "8", "256GB")
    assert "partition" not in flags and "account" not in flags  # null: left to the cluster's defaults
    # srun starts the 16 tasks; each one's log lands beside the sweep's Hydra logs
    (sweep,) = tmp_path.glob("multirun/*/*")
    assert flags["output"] == f"{sweep}/.submitit/%j/%j_0_log.out"
    assert re.search(r"^srun .*-m submitit\.core\._submit ", script, flags=re.M)


@pytest.mark.slow
def test_partition_and_account_come_from_conf_local_and_the_command_line_wins(tmp_path, fake_slurm):
    # a conf/local/slurm.yaml of this test's own: an option of the local group in a search path of its own
    local = tmp_path / "extra_conf" / "local"
    local.mkdir(parents=True)
    (local / "pytest_cluster.yaml").write_text("partition: gpu-a100\naccount: from-local\n")
    script = submit(
        [
            *PAPER_ON_TWO_NODES,
            f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]",
            "local@hydra.launcher=pytest_cluster",
            "hydra.launcher.account=from-cli",
        ],
        tmp_path,
        fake_slurm,
    )
    flags = sbatch_flags(script)
    assert (flags["partition"], flags["account"], flags["nodes"]) == ("gpu-a100", "from-cli", "2")


def test_a_typo_in_the_slurm_launcher_settings_fails_while_composing_naming_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"hydra\.launcher\.partitoin"):
        compose_config(["hydra/launcher=slurm", NO_LOCAL_SLURM, "hydra.launcher.partitoin=gpu"], tmp_path, hydra=True)
    local = tmp_path / "extra_conf" / "local"
    local.mkdir(parents=True)
    (local / "typo.yaml").write_text("partitoin: gpu\n")
    with pytest.raises(ConfigCompositionException, match=r"(?s)In 'local/typo'.*full_key: hydra\.launcher\.partitoin"):
        compose_config(
            [
                "hydra/launcher=slurm",
                f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]",
                "local@hydra.launcher=typo",
            ],
            tmp_path,
            hydra=True,
        )


@pytest.mark.slow
def test_a_key_forced_in_with_plus_is_refused_by_submitit_before_anything_is_submitted(tmp_path, fake_slurm):
    # `+` makes Hydra add any key, even into the plugin's structured config; submitit then names it
    env, submitted = fake_slurm
    proc = run_cli(
        [*PAPER_ON_TWO_NODES, NO_LOCAL_SLURM, "+hydra.launcher.partitoin=gpu"], tmp_path, env=env, check=False
    )
    assert proc.returncode != 0
    assert "Unknown argument 'partitoin' for executor 'slurm'" in proc.stderr, proc.stderr[-3000:]
    assert not submitted.exists()
