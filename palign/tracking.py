"""Experiment tracking: W&B by default (offline by itself without an API key), CSV, or nothing.

Runs are identified by a stable id derived from the run's config, so rerunning a job resumes the
same W&B run instead of creating a duplicate; the group is the sweep name and the job type the
stage. The W&B run is always closed in a `finally` by `Tracker.close`, so a failed multirun job
never leaves a live run that the next job would log into. Final values (the evaluation's Pass@k and
their intervals) are declared with W&B's `define_metric`, and an ablation's knob and value reach the
run config under flat keys (`ablation.knob`, `ablation.value`: palign/pipeline.py), so W&B's UI
compares and groups runs by them.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.path.expanduser("~/.netrc")).authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return auth is not None


def resolve_wandb_mode(mode: str) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    return "online" if wandb_has_credentials() else "offline"


class Tracker:
    """Owns the Lightning logger of one run and closes it whatever happens."""

    def __init__(
        self,
        kind: str,
        run_dir: Path,
        run_id: str,
        run_name: str,
        group: str,
        job_type: str,
        *,
        project: str,
        entity: str | None,
        mode: str,
        tags: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        rank_zero: bool = True,
    ):
        """`kind`, `project`, `entity` and `mode`: the `logger` node's fields (palign/schema.py: Logger
        documents each and holds its default)."""
        self.kind = kind
        # Lightning's loggers write on global rank 0 only; the run's own summaries, tables and
        # histograms likewise (on another rank W&B's experiment is a stand-in without a summary)
        self.rank_zero = rank_zero
        self.run_dir = Path(run_dir)
        self.logger = None
        if kind == "wandb":
            from pytorch_lightning.loggers import WandbLogger

            resolved = resolve_wandb_mode(mode)
            if resolved == "offline":
                log.info(
                    "W&B: no API key found, logging offline under %s (sync later with `wandb sync`)", run_dir / "wandb"
                )
            self.logger = WandbLogger(
                project=project,
                entity=entity,
                name=run_name,
                id=run_id,
                group=group,
                job_type=job_type,
                tags=list(tags),
                save_dir=str(run_dir),
                mode=resolved,
                resume="allow",
                config=dict(config or {}),
                settings=_quiet_wandb_settings(),
            )
        elif kind == "csv":
            from pytorch_lightning.loggers import CSVLogger

            # one version folder per invocation (csv/version_<n>/metrics.csv): a fixed folder would
            # make Lightning delete the metrics of the run's earlier attempts, e.g. before a resume
            self.logger = CSVLogger(save_dir=str(run_dir), name="csv")
            if config:
                self.logger.log_hyperparams(dict(config))
        elif kind != "none":
            raise ValueError(f"logger.kind must be wandb, csv or none, got '{kind}'")

    @property
    def lightning_logger(self):
        return self.logger if self.logger is not None else False

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.rank_zero:
            return
        if self.logger is not None:
            self.logger.log_metrics(dict(metrics), step=step)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Final values of a run (W&B run summary; a metrics row elsewhere)."""
        if not self.rank_zero:
            return
        if self.kind == "wandb":
            self.logger.experiment.summary.update(dict(metrics))
        elif self.logger is not None:
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.logger.log_metrics(numeric)

    def log_final(self, metrics: Mapping[str, float]) -> None:
        """A run's final values, logged once. In W&B each key is first declared with
        `define_metric(summary="last")`, so the run summary holds its final value (as `{"last": v}`)
        for run comparisons and parallel-coordinates panels, and the history holds the value too;
        elsewhere one metrics row."""
        if not self.rank_zero:
            return
        if self.kind == "wandb":
            for key in metrics:
                self.logger.experiment.define_metric(key, summary="last")
        self.log_metrics(metrics)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not self.rank_zero:
            return
        if self.kind == "wandb":
            import wandb

            self.logger.experiment.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_histogram(self, key: str, values: Sequence[float]) -> None:
        if not self.rank_zero:
            return
        if self.kind == "wandb" and values:
            import wandb

            self.logger.experiment.log({key: wandb.Histogram(list(values))})

    def close(self, failed: bool = False) -> None:
        if self.kind == "wandb":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1 if failed else 0)
        elif self.kind == "csv" and self.logger is not None:
            self.logger.save()


def _quiet_wandb_settings():
    import wandb

    return wandb.Settings(silent=True, console="off", x_disable_stats=True)
