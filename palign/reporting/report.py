"""The report: Table 1, the ablation tables and the figures from finished runs (the experiments issue).

`make_report` collects finished runs (local run folders, or a W&B group online), writes every table
as Markdown and CSV, draws the figures, writes one `report.md` page, and logs all of it to the
tracker when one is given. `python run.py stage=report` and `experiments/make_table.py` call it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

from palign.artifacts import write_text_atomic
from palign.reporting.plots import (
    densest_config,
    plot_accuracy_vs_length,
    plot_prefix_ratios,
    plot_sufficiency_curves,
    truncation_rows_by_config,
)
from palign.reporting.tables import build_tables, collect_local_runs, collect_wandb_runs, write_tables

log = logging.getLogger(__name__)


def make_report(
    runs_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    pass_k: int | None = None,
    tracker=None,
    wandb_project: str | None = None,
    wandb_group: str | None = None,
    wandb_entity: str | None = None,
    pass1_key: str = "pass@1",
) -> dict[str, Any]:
    """Write the tables and figures of every finished run under `runs_dir` (or of the W&B group
    `wandb_group` when `wandb_project` is given) to `out_dir`; log them to `tracker` if given.

    `pass_k` None takes the runs' common number of samples (3 when they differ).
    Returns `{"runs", "unfinished", "tables": {name: {"markdown", "csv"}}, "plots": {name: path or
    None}, "table1": Table 1 in Markdown, "report": path of report.md}`.
    """
    if wandb_project:
        if not wandb_group:
            raise ValueError("reading runs from W&B needs the group too (--wandb-group: the sweep's `group=`)")
        runs, unfinished = collect_wandb_runs(wandb_project, wandb_group, wandb_entity)
        where = f"W&B {wandb_project}/{wandb_group}"
    else:
        runs, unfinished = collect_local_runs(runs_dir)
        where = str(runs_dir)
    if not runs:
        raise ValueError(f"no evaluated run in {where}" + (f" (not evaluated yet: {', '.join(unfinished)})" if unfinished else "")
                         + "; finish one with `python run.py` (or `stage=eval`) first")
    out_dir = Path(out_dir)
    if pass_k is None:  # the runs' own sample count when they agree, else the paper's 3
        counts = {int(s["num_samples"]) for run in runs for s in run.benchmarks.values() if "num_samples" in s}
        pass_k = counts.pop() if len(counts) == 1 else 3
    tables = build_tables(runs, pass_k, pass1_key)
    written = write_tables(tables, out_dir)

    rows_by_config = truncation_rows_by_config(runs)
    curve_config = densest_config(rows_by_config)
    plots = {
        "prefix_ratios": plot_prefix_ratios(rows_by_config, out_dir / "prefix_ratios.png"),
        "sufficiency_curves": plot_sufficiency_curves(rows_by_config.get(curve_config, []), out_dir / "sufficiency_curves.png",
                                                      title=curve_config),
        "accuracy_vs_length": plot_accuracy_vs_length(runs, out_dir / "accuracy_vs_length.png", pass_k, pass1_key),
    }

    report = out_dir / "report.md"
    write_text_atomic(report, _report_page(where, runs, unfinished, tables, plots))
    if tracker is not None:
        log_report(tracker, tables, plots)
    return {
        "runs": [run.name for run in runs],
        "unfinished": unfinished,
        "tables": {name: {"markdown": str(md), "csv": str(csv_path)} for name, (md, csv_path) in written.items()},
        "plots": {name: str(path) if path else None for name, path in plots.items()},
        "table1": tables["table1"][0],
        "report": str(report),
    }


def _report_page(where: str, runs, unfinished: list[str], tables: dict[str, tuple[str, str]], plots: dict[str, Path | None]) -> str:
    parts = [f"# Report\n\n{len(runs)} evaluated run(s) from {where}."]
    if unfinished:
        parts.append(f"Not evaluated yet, left out: {', '.join(unfinished)}.")
    for name, (markdown, _) in tables.items():
        parts.append(f"## {name}\n\n{markdown.rstrip()}")
    parts += [f"![{name}]({path.name})" for name, path in plots.items() if path is not None]
    return "\n\n".join(parts) + "\n"


def log_report(tracker, tables: dict[str, tuple[str, str]], plots: dict[str, Path | None]) -> None:
    """Tables as W&B tables (`report/<name>`), figures as W&B images when logging to W&B."""
    for name, (_, csv_text) in tables.items():
        header, *rows = csv.reader(io.StringIO(csv_text))
        tracker.log_table(f"report/{name}", header, rows)
    if tracker.kind == "wandb":
        import wandb

        images = {f"report/{name}": wandb.Image(str(path)) for name, path in plots.items() if path is not None}
        if images:
            tracker.logger.experiment.log(images)


