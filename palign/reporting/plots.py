"""The report's figures: where adaptive prefixes end (§2.1), how the judge's verdict grows along a
trace, what accuracy costs in supervision length (the paper's efficiency argument, §7), and one
forest plot per comparison (Table 1 against its reference row, each ablation against its reference
arm): every difference with its interval, per benchmark and Avg.

Figures are drawn on a bare `matplotlib.figure.Figure` (the Agg canvas, no pyplot state, no
display) and written atomically. A figure whose data is missing (no truncation artifact, no probe
scores, no data statistics in the summaries: e.g. runs read from W&B) is skipped with a log line
and its function returns None.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from palign.artifacts.readers import iter_jsonl, require_field
from palign.artifacts.writes import atomic_path
from palign.reporting.tables import RunRecord, Table, average_cells, method_labels, options_of

log = logging.getLogger(__name__)


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def truncation_label(run: RunRecord) -> str:
    """A truncation config in words, e.g. `binary · sentence · judge tiny_random/logits/paper`."""
    granularity = run.part_name("truncation.granularity")
    if "search" not in run.prefix_reads:  # e.g. a fixed ratio: the baseline and its policy's options
        options = " ".join(str(value) for _, value in sorted(options_of(run, "baseline.prefix").items()))
        return f"{run.baseline}{' ' + options if options else ''} · {granularity}"
    return (
        f"{run.part_name('truncation.search')} · {granularity} · judge "
        f"{run.get('truncation.judge.model.name')}/{run.get('truncation.judge.mode')}/"
        f"{run.get('truncation.judge_prompt.name')}"
    )


def read_truncation_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a truncation artifact's `records.jsonl`; a row lacking a field the figures
    need raises `DataFormatError` naming file, line and field."""
    rows = []
    for lineno, row in iter_jsonl(path):
        for field in ("id", "m", "chosen_k", "prefix_ratio", "probes"):
            require_field(row, field, f"{path}:{lineno}")
        rows.append(row)
    return rows


def truncation_rows_by_config(runs: Sequence[RunRecord]) -> dict[str, list[dict[str, Any]]]:
    """`{config label: rows}`, one entry per distinct truncation artifact (runs sharing a
    truncation config, e.g. palign and prefix_only, share one)."""
    by_records: dict[Path, RunRecord] = {}
    for run in runs:
        if not run.prefix_reads:
            continue
        records = run.truncation_records()
        if records is None:
            log.info(
                "%s: truncation records not found (artifact %s); left out of the prefix figures",
                run.name,
                (run.summary.get("truncation") or {}).get("artifact"),
            )
            continue
        by_records.setdefault(records, run)
    labels = [truncation_label(run) for run in by_records.values()]
    result = {}
    for records, label in zip(by_records, labels):
        if labels.count(label) > 1:
            label = f"{label} [{records.parent.name}]"
        result[label] = read_truncation_rows(records)
    return result


def plot_prefix_ratios(
    source: Sequence[RunRecord] | Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike
) -> Path | None:
    """Histogram of prefix ratios (chosen k / m) per truncation config, one panel each.

    `source` is either runs (their truncation artifacts are read) or `{config label: rows}`.
    """
    rows_by_config = dict(source) if isinstance(source, Mapping) else truncation_rows_by_config(source)
    rows_by_config = {label: rows for label, rows in rows_by_config.items() if rows}
    if not rows_by_config:
        log.info("no truncation records: prefix ratio figure skipped")
        return None
    figure = Figure(figsize=(7, 1.2 + 1.8 * len(rows_by_config)))
    axes = figure.subplots(len(rows_by_config), 1, sharex=True, squeeze=False)[:, 0]
    bins = [i / 20 for i in range(21)]
    for ax, (label, rows) in zip(axes, rows_by_config.items()):
        ratios = [row["prefix_ratio"] for row in rows]
        mean = statistics.fmean(ratios)
        ax.hist(ratios, bins=bins, color="tab:blue", alpha=0.8)
        ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(f"{label}  (n={len(ratios)}, mean {mean:.2f})", fontsize=9)
        ax.set_ylabel("traces")
    axes[-1].set_xlabel("prefix ratio (chosen k / m units)")
    axes[-1].set_xlim(0, 1)
    return _save(figure, path)


def _scored_probes(row: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return sorted((p for p in row["probes"] if p.get("score") is not None), key=lambda p: p["k"])


def densest_config(rows_by_config: Mapping[str, Sequence[Mapping[str, Any]]]) -> str | None:
    """The truncation config whose examples have the most scored probes on average (exhaustive >
    linear > binary search), i.e. the one that draws the most informative sufficiency curves."""
    density = {
        label: statistics.fmean(len(_scored_probes(row)) for row in rows)
        for label, rows in rows_by_config.items()
        if rows
    }
    best = max(density, key=density.get, default=None)
    return best if best is not None and density[best] > 0 else None


def plot_sufficiency_curves(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, max_examples: int = 4, title: str | None = None
) -> Path | None:
    """Judge score against prefix length (k / m) for the examples with the most scored probes.

    Filled markers are prefixes judged sufficient, hollow ones not; the star is the chosen k and
    the dotted line the example's threshold (logits mode). Needs at least two scored probes per
    example (the generate-mode judge gives verdicts without scores).
    """
    candidates = [row for row in rows if len(_scored_probes(row)) >= 2]
    if not candidates:
        log.info("no example with two or more scored probes: sufficiency curve figure skipped")
        return None
    chosen = sorted(candidates, key=lambda row: (-len(_scored_probes(row)), str(row["id"])))[:max_examples]
    figure = Figure(figsize=(7, 4.5))
    ax = figure.subplots()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    for index, row in enumerate(chosen):
        color = colors[index % len(colors)]
        m = row["m"]
        probes = _scored_probes(row)
        xs, ys = [p["k"] / m for p in probes], [p["score"] for p in probes]
        ax.plot(xs, ys, color=color, linewidth=1, label=f"{row['id']} (m={m}, chosen k={row['chosen_k']})")
        for x, y, probe in zip(xs, ys, probes):
            ax.scatter([x], [y], s=30, color=color if probe["sufficient"] else "white", edgecolors=color, zorder=3)
        at_chosen = [p["score"] for p in probes if p["k"] == row["chosen_k"]]
        if at_chosen:
            ax.scatter([row["chosen_k"] / m], at_chosen, marker="*", s=160, color=color, edgecolors="black", zorder=4)
        if row.get("threshold") is not None:
            ax.axhline(row["threshold"], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("prefix length k / m")
    ax.set_ylabel("judge score (sufficient vs not)")
    ax.set_xlim(0, 1.02)
    ax.set_title(title or "sufficiency along the trace", fontsize=9)
    ax.legend(fontsize=7)
    return _save(figure, path)


def plot_accuracy_vs_length(
    runs: Sequence[RunRecord], path: str | os.PathLike, k: int = 3, pass1_key: str = "pass@1"
) -> Path | None:
    """Avg Pass@1 (as Table 1 prints it) against mean supervision length (response tokens per
    training example), one point per run labelled by its Method, one marker per student."""
    labels = method_labels(runs)
    points = []
    for run in runs:
        length, (avg1, _) = run.supervision_tokens_mean, average_cells(run, k, pass1_key)
        if length is None or avg1 is None:
            log.info("%s: no data statistics or Pass@1 in its summary; left out of the accuracy figure", run.name)
            continue
        points.append((run.student, labels[run.name], length, float(avg1)))
    if not points:
        log.info("no run with data statistics: accuracy vs supervision length figure skipped")
        return None
    figure = Figure(figsize=(7, 4.5))
    ax = figure.subplots()
    markers = ["o", "s", "^", "D", "v", "P"]
    students = sorted({student for student, *_ in points})
    for index, student in enumerate(students):
        mine = [p for p in points if p[0] == student]
        ax.scatter(
            [p[2] for p in mine], [p[3] for p in mine], marker=markers[index % len(markers)], s=40, label=student
        )
        for _, label, x, y in mine:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("mean supervision length (response tokens per training example)")
    ax.set_ylabel("Avg Pass@1 (%)")
    ax.legend(fontsize=8, title="student")
    return _save(figure, path)


def plot_forest(table: Table, path: str | os.PathLike, title: str) -> Path | None:
    """A forest plot of a table's paired differences: one line per compared row and column (each
    benchmark, then Avg as a diamond), the difference and its interval, one panel per metric; red
    where the difference is marked (its interval excludes 0 and the permutation test agrees). None
    when the table has no differences (no reference row, or no per-problem outcomes)."""
    rows = table.forest
    if not rows:
        log.info("%s: no paired differences: forest plot skipped", title)
        return None
    metrics = list(dict.fromkeys(row.metric for row in rows))
    lines = list(dict.fromkeys((row.label, row.column) for row in rows))
    figure = Figure(figsize=(4 + 3 * len(metrics), 1.4 + 0.32 * len(lines)))
    axes = figure.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for row in rows:
            if row.metric != metric:
                continue
            y = len(lines) - 1 - lines.index((row.label, row.column))
            color = "tab:red" if row.difference.marked else "tab:blue"
            interval = row.difference.interval
            ax.plot([interval.low, interval.high], [y, y], color=color, linewidth=1.5)
            ax.scatter(
                [row.difference.delta], [y], marker="D" if row.column == "Avg" else "o", s=30, color=color, zorder=3
            )
        ax.axvline(0.0, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"Δ {metric}", fontsize=9)
        ax.set_xlabel("difference (points)")
    axes[0].set_yticks(range(len(lines)))
    axes[0].set_yticklabels([f"{label} · {column}" for label, column in reversed(lines)], fontsize=7)
    axes[0].set_ylim(-0.7, len(lines) - 0.3)
    figure.suptitle(f"{title}: row minus {table.reference}", fontsize=9, y=1.02)
    return _save(figure, path)
