"""The report: Table 1, the ablation tables and the figures from finished runs (the experiments issue),
with an interval on every cell, paired differences from reference rows, seeds pooled, published
rows beside the runs, and a forest plot per comparison.

`make_report` collects finished runs (local run folders and `stage=grade` folders, or a W&B group
online), pools seeds, writes every table as Markdown and CSV, draws the figures, writes one
`report.md` page, and logs all of it to the tracker when one is given. `python run.py stage=report`
and `experiments/make_table.py` call it with the `report` node of their config
(palign/schema.py: Report).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from palign.artifacts.writes import write_text_atomic
from palign.reporting.plots import (
    densest_config,
    plot_accuracy_vs_length,
    plot_forest,
    plot_prefix_ratios,
    plot_sufficiency_curves,
    truncation_rows_by_config,
)
from palign.reporting.published import select_published
from palign.reporting.tables import (
    RunRecord,
    Table,
    build_tables,
    collect_graded_runs,
    collect_local_runs,
    collect_wandb_runs,
    pool_seeds,
    write_tables,
)
from palign.schema import Report

log = logging.getLogger(__name__)


def make_report(
    runs_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    report: Report | None = None,
    *,
    tracker=None,
    graded_dir: str | os.PathLike | None = None,
    recipe: Mapping[str, Any] | None = None,
    wandb_project: str | None = None,
    wandb_group: str | None = None,
    wandb_entity: str | None = None,
) -> dict[str, Any]:
    """Write the tables and figures of every finished run under `runs_dir` and every prediction file
    graded under `graded_dir` (or of the W&B group `wandb_group` when `wandb_project` is given) to
    `out_dir`; log them to `tracker` if given.

    report: the settings (palign/schema.py: Report; None: its defaults). `report.pass_k` None takes
    the runs' common number of samples (3 when they differ).
    recipe: the report's own resolved config: each ablation compares its arms with the recipe's
    value of the knob.

    Returns `{"runs", "unfinished", "notes", "tables": {name: {"markdown", "csv"}}, "plots": {name:
    path or None}, "table1": Table 1 in Markdown, "report": path of report.md, "intervals": the
    interval settings}`.
    """
    report = report or Report()
    if wandb_project:
        if not wandb_group:
            raise ValueError("reading runs from W&B needs the group too (--wandb-group: the sweep's `group=`)")
        runs, unfinished = collect_wandb_runs(wandb_project, wandb_group, wandb_entity)
        where = f"W&B {wandb_project}/{wandb_group}"
    else:
        graded_only = graded_dir is not None and Path(graded_dir).is_dir() and not Path(runs_dir).is_dir()
        runs, unfinished = (
            ([], []) if graded_only else collect_local_runs(runs_dir)
        )  # a missing runs folder is an error
        where = str(runs_dir)
        if graded_dir is not None:
            graded = collect_graded_runs(graded_dir)
            runs += graded
            if graded:
                where += f" and the predictions graded in {graded_dir}"
    if not runs:
        raise ValueError(
            f"no evaluated run in {where}"
            + (f" (not evaluated yet: {', '.join(unfinished)})" if unfinished else "")
            + "; finish one with `python run.py` (or `stage=eval`) first"
        )
    rows, notes = pool_seeds(runs)
    out_dir = Path(out_dir)
    pass_k = report.pass_k
    if pass_k is None:  # the runs' own sample count when they agree, else the paper's 3
        counts = {int(s["num_samples"]) for run in rows for s in run.benchmarks.values() if "num_samples" in s}
        pass_k = counts.pop() if len(counts) == 1 else 3
    published = select_published(list(report.published), report.published_file)
    recipe_record = RunRecord("recipe", dict(recipe), {}, "the report's config") if recipe else None
    tables = build_tables(rows, report, pass_k, published, recipe_record)
    written = write_tables(tables, out_dir)

    rows_by_config = truncation_rows_by_config(rows)
    curve_config = densest_config(rows_by_config)
    plots = {
        "prefix_ratios": plot_prefix_ratios(rows_by_config, out_dir / "prefix_ratios.png"),
        "sufficiency_curves": plot_sufficiency_curves(
            rows_by_config.get(curve_config, []), out_dir / "sufficiency_curves.png", title=curve_config
        ),
        "accuracy_vs_length": plot_accuracy_vs_length(rows, out_dir / "accuracy_vs_length.png", pass_k, report.pass1),
    }
    forests = {
        name: plot_forest(table, out_dir / f"forest_{name}.png", name)
        for name, table in tables.items()
        if name != "reproduction"
    }
    plots.update({f"forest_{name}": path for name, path in forests.items()})

    page = out_dir / "report.md"
    write_text_atomic(page, _report_page(where, rows, unfinished, notes, tables, plots))
    if tracker is not None:
        log_report(tracker, tables, plots)
    return {
        "runs": [run.name for run in runs],
        "unfinished": unfinished,
        "notes": notes,
        "tables": {name: {"markdown": str(md), "csv": str(csv_path)} for name, (md, csv_path) in written.items()},
        "plots": {name: str(path) if path else None for name, path in plots.items()},
        "table1": tables["table1"].markdown,
        "report": str(page),
        "intervals": asdict(report.intervals),
    }


def _report_page(
    where: str, rows, unfinished: list[str], notes: list[str], tables: dict[str, Table], plots: dict[str, Path | None]
) -> str:
    runs = sum(len(row.runs) for row in rows)
    parts = [
        f"# Report\n\n{runs} evaluated run(s) from {where}, in {len(rows)} row(s) (runs that differ in their seed "
        "alone are one row)."
    ]
    if unfinished:
        parts.append(f"Not evaluated yet, left out: {', '.join(unfinished)}.")
    parts += [f"Seeds: {note}." for note in notes]
    for name, table in tables.items():
        parts.append(f"## {name}\n\n{table.markdown.rstrip()}")
        forest = plots.get(f"forest_{name}")
        if forest is not None:
            parts.append(f"![forest_{name}]({forest.name})")
    parts += [
        f"![{name}]({path.name})" for name, path in plots.items() if path is not None and not name.startswith("forest_")
    ]
    return "\n\n".join(parts) + "\n"


def log_report(tracker, tables: dict[str, Table], plots: dict[str, Path | None]) -> None:
    """Tables as W&B tables (`report/<name>`), figures as W&B images when logging to W&B."""
    for name, table in tables.items():
        header, *rows = csv.reader(io.StringIO(table.csv))
        tracker.log_table(f"report/{name}", header, rows)
    if tracker.kind == "wandb":
        import wandb

        images = {f"report/{name}": wandb.Image(str(path)) for name, path in plots.items() if path is not None}
        if images:
            tracker.logger.experiment.log(images)
