"""Multirun sweeps: a failed job neither stops nor poisons the others, and all failures are reported.

Hydra's basic sweeper re-raises the first failed job's exception once the batch ends, which hides
every other outcome. In multirun mode `run_job_safely` records each job's outcome (and the
traceback of a failure) in `<sweep dir>/jobs.jsonl` instead of raising; the `SweepReport`
callback prints one line per job when the sweep ends and exits non-zero if any failed. W&B runs
are closed by each job's own `finally` (palign/tracking.py), so the next job starts clean.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from palign.artifacts.stores import is_global_zero

log = logging.getLogger(__name__)

JOBS_FILE = "jobs.jsonl"


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_job_safely(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run one job; in a multirun, record a failure instead of raising it."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or not is_global_zero():
        # every task of a SLURM job runs the job function; one job is one record, rank 0's
        return task(cfg)
    record = {"num": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task)}
    jobs = Path(hydra_cfg.sweep.dir) / JOBS_FILE
    try:
        result = task(cfg)
    except Exception as err:  # noqa: BLE001 - every failure is recorded and reported at the end
        log.error("job %s failed:\n%s", record["num"], traceback.format_exc())
        _append(jobs, {**record, "status": "failed", "error": f"{type(err).__name__}: {err}"})
        return None
    _append(jobs, {**record, "status": "ok"})
    return result


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / JOBS_FILE
        if not path.exists():
            return
        jobs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        failed = [job for job in jobs if job["status"] != "ok"]
        lines = [f"sweep finished: {len(jobs) - len(failed)} of {len(jobs)} jobs succeeded ({path})"]
        for job in sorted(jobs, key=lambda j: j["num"]):
            line = f"  [{job['status']:>6}] #{job['num']} {' '.join(job['overrides'])}"
            if job["status"] != "ok":
                line += f"\n           {job['error']}"
            lines.append(line)
        print("\n".join(lines))
        if failed:
            raise SystemExit(1)
