"""A real driver, with the local Ray cluster it started, killed with SIGKILL mid-stage and rerun.

`python run.py stage=align` with the judge and the continuation over 2 Ray workers, and `stage=eval`
with evaluation over them, is killed right after it stored 3 records of one stage
(tests/helpers/kill_driver.py), then the same command runs again: the rerun recomputes none of the stored
records, duplicates none, and ends with what an uninterrupted in-process run stores (greedy
decoding, so the generations are comparable).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import NO_LOCAL, PROJECT_ROOT, cli_env, run_cli

pytest.importorskip("ray", reason="pip install 'palign[ray]'")

pytestmark = pytest.mark.slow  # each run starts Ray and loads the model in 2 actors (~30-60 s on 2 cores)

RUN = [
    "experiment=tiny",
    "stage=align",
    "baseline=palign",
    "alignment.sampling.do_sample=false",
    "alignment.chunk_size=2",
    "truncation.chunk_size=2",
    "logger=none",
]
OVER_RAY = [
    "backend@truncation.judge.backend=ray",
    "backend@alignment.backend=ray",
    "ray.num_workers=2",
    "ray.batch_size=2",
]
# the base tiny model on 8 held-out CHAMP problems, greedy, 2 problems per stored chunk
EVAL = [
    "experiment=tiny",
    "stage=eval",
    "evaluation.benchmarks.champ_heldout.limit=8",
    "evaluation.sampling.do_sample=false",
    "evaluation.sampling.num_samples=1",
    "evaluation.pass_k=1",
    "evaluation.chunk_size=2",
    "logger=none",
]
EVAL_OVER_RAY = ["backend@evaluation.backend=ray", "ray.num_workers=2", "ray.batch_size=2"]
COMMANDS = {"truncation": (RUN, OVER_RAY), "alignment": (RUN, OVER_RAY), "eval": (EVAL, EVAL_OVER_RAY)}


@pytest.fixture()
def ray_env():
    """A short temporary folder for Ray's sockets (their paths may not exceed 107 bytes) and quiet Ray."""
    folder = tempfile.mkdtemp(prefix="palign-ray-", dir="/tmp")
    try:
        yield {"RAY_TMPDIR": folder, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same runs in process (hf back ends), uninterrupted: the stores to compare with."""
    stores = {}

    def of(stage: str) -> list[dict]:
        if stage not in stores:
            out = tmp_path_factory.mktemp(f"reference-{stage}")
            run_cli(COMMANDS[stage][0], out)
            for name in ("truncation", "alignment") if stage != "eval" else ("eval",):
                stores[name] = stored(out, name)
        return stores[stage]

    return of


def stored(out, stage: str) -> list[dict]:
    pattern = "runs/*/eval/*/champ_heldout.jsonl" if stage == "eval" else f"cache/{stage}/*/records.jsonl"
    (store,) = out.glob(pattern)
    return [json.loads(line) for line in store.read_text().splitlines()]


def summary(out) -> dict:
    (path,) = (out / "runs").glob("*/summary.json")
    return json.loads(path.read_text())


def decided(rows: list[dict], stage: str) -> dict:
    """What each record holds that the back end must not change (judge scores to float tolerance)."""
    if stage == "truncation":
        return {
            r["key"]: (
                r["chosen_k"],
                r["prefix"],
                [(p["k"], p["sufficient"], round(p["score"], 4)) for p in r["probes"]],
            )
            for r in rows
        }
    if stage == "eval":
        return {r["id"]: (r["output"], r["tokens"], r["finished"]) for r in rows}
    return {r["key"]: (r["continuation"], r["tokens"], r["finished"]) for r in rows}


@pytest.mark.parametrize("stage", ["truncation", "alignment", "eval"])
def test_a_driver_killed_mid_stage_resumes_without_redoing_or_duplicating(stage, tmp_path, ray_env, reference):
    run, over_ray = COMMANDS[stage]
    expected = reference(stage)
    command = [
        sys.executable,
        str(PROJECT_ROOT / "tests" / "helpers" / "kill_driver.py"),
        stage,
        "3",
        NO_LOCAL,
        *run,
        *over_ray,
    ]
    killed = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=cli_env(tmp_path, ray_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = killed.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of its process group is left (the hook kills it all)
            os.killpg(killed.pid, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, output[-4000:]
    first = stored(tmp_path, stage)
    assert len(first) == 3 < len(expected)  # killed mid-stage

    rerun = run_cli([*run, *over_ray], tmp_path, env=ray_env)
    rows = stored(tmp_path, stage)
    key = "id" if stage == "eval" else "key"
    keys = [r[key] for r in rows]
    assert len(keys) == len(set(keys)) == len(expected)  # nothing duplicated, nothing missing
    assert rows[:3] == first  # the stored records are kept as they were
    assert decided(rows, stage) == decided(expected, stage)
    if stage == "eval":  # the rerun generated only the problems that were not stored
        missing = len(expected) - 3
        assert re.search(rf"eval champ_heldout: 100%\|.*\| {missing}/{missing} ", rerun.stderr), rerun.stderr[-2000:]
        return
    resumed = summary(tmp_path)
    if stage == "truncation":  # the rerun judged only the traces that were not stored
        assert resumed["truncation"]["judge_calls_this_run"] == sum(len(r["probes"]) for r in rows[3:])
    else:
        assert resumed["alignment"]["generated_this_run"] == len(rows) - 3
        assert resumed["truncation"]["judge_calls_this_run"] == 0  # stored before the kill: not judged again
