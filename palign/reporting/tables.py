"""The paper's tables from finished runs: Table 1 (§7.1) and the ablation tables (§6).

Runs come from local run folders (`summary.json` + the resolved `config.yaml`, offline) or from
the W&B API (online, one sweep = one W&B group). Each becomes a `RunRecord` with the same nested
summary schema that `palign.pipeline` writes, so everything after collection is source-agnostic.

Table 1 rows are (student, baseline). Its cells come from `results_table`, the one place that
rounds and averages Pass@k as the paper does; below it, a second table states what every cell
rests on (problems x samples per problem, and the generation budget), because a Pass@1 over
2 x 2 samples and one over 500 x 3 print the same way.

An ablation table compares runs that differ in exactly one knob (granularity, search, judge mode,
judge prompt, judge model, the fixed ratio, or the baseline among palign / prefix_only /
student_only). "Differ in exactly one knob" is decided on the config keys that name a run folder
(`palign.runs.run_identity` of the stored config, typed by palign/schema.py) plus the evaluation
settings, with the knob's own keys left out. The baseline knob compares the identity of every
stage, used or not, so compare baselines with runs launched by the same command line with only
`baseline=` changed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from palign.artifacts import DataFormatError, read_json, write_text_atomic
from palign.evaluation.predictions import MISSING, PAPER_BENCHMARKS, display_name, render_table, results_table

log = logging.getLogger(__name__)


BASELINE_ORDER: tuple[str, ...] = ("sft_short_cot", "sft_long_cot", "fixed_ratio", "prefix_only", "student_only", "palign")
"""Row order within a student: the baselines first, P-ALIGN last, as in the paper's Table 1."""

ALIGNMENT_BASELINES: tuple[str, ...] = ("prefix_only", "student_only", "palign")
"""The baseline ablation (§6): prefix alone, continuation alone, and both."""

_EVALUATION_KEYS = ("benchmarks", "sampling", "model_path")
"""The evaluation settings that change a Pass@k cell (the grading pool's size does not)."""


@dataclass
class RunRecord:
    """One finished run: its resolved config and its summary (the schema of `summary.json`)."""

    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    source: str
    """Where it was read: the run folder, or the W&B run's URL."""
    _identities: dict[bool, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    """`_identity` per `used_only`, computed once (each costs a config compose)."""

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted path (`judge.model.name`), or `default`."""
        value: Any = self.config
        for part in dotted.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return default
            value = value[part]
        return value

    @property
    def student(self) -> str:
        return str(self.get("student.name", "?"))

    @property
    def baseline(self) -> str:
        return str(self.get("baseline.name", "?"))

    @property
    def truncation_mode(self) -> str:
        return str(self.get("baseline.truncation", "none"))

    @property
    def benchmarks(self) -> dict[str, dict[str, Any]]:
        return dict(self.summary.get("eval", {}).get("benchmarks", {}))

    @property
    def prefix_ratio_mean(self) -> float | None:
        truncation = self.summary.get("truncation") or {}
        return truncation.get("prefix_ratio_mean") if truncation.get("examples") else None

    @property
    def retention(self) -> float | None:
        alignment = self.summary.get("alignment") or {}
        return alignment.get("retention") if alignment.get("examples") else None

    @property
    def supervision_tokens_mean(self) -> float | None:
        """Response tokens per training example: what one SFT target costs on average."""
        data = self.summary.get("data") or {}
        tokens, examples = data.get("train/response_tokens"), data.get("train/examples")
        return tokens / examples if tokens is not None and examples else None

    def truncation_records(self) -> Path | None:
        """The truncation artifact's `records.jsonl`, or None.

        The summary records the artifact's absolute path; when the outputs were moved (another
        machine, another `PALIGN_OUTPUTS`), the same folder name is looked up under the config's
        cache folder and under `<runs folder>/../cache`.
        """
        artifact = (self.summary.get("truncation") or {}).get("artifact")
        if not artifact:
            return None
        recorded = Path(artifact)
        candidates = [recorded]
        if self.get("paths.cache_dir"):
            candidates.append(Path(self.get("paths.cache_dir")) / "truncation" / recorded.name)
        if Path(self.source).is_dir():
            candidates.append(Path(self.source).parent.parent / "cache" / "truncation" / recorded.name)
        for folder in candidates:
            if (folder / "records.jsonl").is_file():
                return folder / "records.jsonl"
        return None


# ---------------------------------------------------------------------------------------------
# Collecting runs


def collect_local_runs(runs_dir: str | os.PathLike) -> tuple[list[RunRecord], list[str]]:
    """Every run folder under `runs_dir` (each `*/summary.json` with its `config.yaml`).

    Returns `(finished, unfinished)`: the runs whose summary has an `eval` section, sorted by
    folder name, and the names of the other run folders (no summary yet, or not evaluated yet),
    which are also logged as a warning.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: no runs folder (a run writes outputs/runs/<run id>/; see --runs-dir)")
    finished: list[RunRecord] = []
    unfinished: list[str] = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        summary_path, config_path = folder / "summary.json", folder / "config.yaml"
        if not config_path.is_file():
            log.warning("%s: no config.yaml; not a run folder, skipped", folder)
            continue
        summary = read_json(summary_path) if summary_path.is_file() else {}
        if not summary.get("eval", {}).get("benchmarks"):
            unfinished.append(folder.name)
            continue
        finished.append(RunRecord(folder.name, _read_config(config_path), summary, str(folder)))
    if unfinished:
        log.warning("%d run(s) in %s are not evaluated yet and are left out: %s", len(unfinished), runs_dir, ", ".join(unfinished))
    return finished, unfinished


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DataFormatError(f"{path}: malformed YAML ({err}); it is the run's resolved config, rewrite it by rerunning the run") from err
    if not isinstance(config, dict):
        raise DataFormatError(f"{path}: expected a mapping (the run's resolved config), got {type(config).__name__}")
    return config


def summary_from_wandb(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A W&B run summary (`eval/<bench>/pass@1`, `eval/avg_pass@1`, `truncation/...`,
    `alignment/...`) in the nested schema of `summary.json`. Non-numeric entries (tables,
    histograms) are dropped; `data` and the truncation artifact path are not logged to W&B."""
    summary: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        parts = key.split("/")
        if parts[0] == "eval" and len(parts) == 3:
            summary.setdefault("eval", {}).setdefault("benchmarks", {}).setdefault(parts[1], {})[parts[2]] = value
        elif parts[0] == "eval" and len(parts) == 2:
            summary.setdefault("eval", {})[parts[1]] = value
        elif parts[0] in ("truncation", "alignment") and len(parts) == 2:
            summary.setdefault(parts[0], {})[parts[1]] = value
    return summary


def collect_wandb_runs(project: str, group: str, entity: str | None = None) -> tuple[list[RunRecord], list[str]]:
    """The runs of one W&B group (a sweep), online; `(finished, unfinished)` as `collect_local_runs`.

    The W&B run id is the run folder's name, so records are named as local ones are.
    """
    import wandb

    path = f"{entity}/{project}" if entity else project
    finished: list[RunRecord] = []
    unfinished: list[str] = []
    for run in wandb.Api().runs(path, filters={"group": group}, lazy=False):  # config and summary are needed
        if run.job_type == "report":
            continue  # the report's own W&B run
        summary = summary_from_wandb(run.summary_metrics)
        if not summary.get("eval", {}).get("benchmarks"):
            unfinished.append(run.id)
            continue
        finished.append(RunRecord(run.id, dict(run.config), summary, run.url))
    if unfinished:
        log.warning("%d W&B run(s) of %s/%s are not evaluated yet and are left out: %s", len(unfinished), path, group, ", ".join(unfinished))
    return sorted(finished, key=lambda r: r.name), sorted(unfinished)


# ---------------------------------------------------------------------------------------------
# Which config decides a run, and what tells two runs apart


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _identity(run: RunRecord, used_only: bool = True) -> dict[str, Any]:
    """Flattened config values that decide the run's results (see the module docstring)."""
    if used_only not in run._identities:
        run._identities[used_only] = _compute_identity(run, used_only)
    return dict(run._identities[used_only])


def _compute_identity(run: RunRecord, used_only: bool) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from palign.runs import run_identity
    from palign.schema import Config

    try:
        typed = OmegaConf.merge(OmegaConf.structured(Config), run.config)
    except OmegaConfBaseException as err:
        raise DataFormatError(f"{run.source}: config does not match palign's schema (written by an older palign?): {err}") from err
    identity = run_identity(typed, every_stage=not used_only)
    evaluation = run.config.get("evaluation") or {}
    identity["evaluation"] = {key: evaluation.get(key) for key in _EVALUATION_KEYS}
    return _flatten(identity)


def _owned(path: str, owners: Sequence[str]) -> bool:
    return any(path == owner or path.startswith(owner + ".") for owner in owners)


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else _canonical(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Knob:
    """One ablation axis: the config keys it owns, which runs it applies to, and its cell value."""

    name: str
    header: str
    owns: tuple[str, ...]
    applies: Callable[[RunRecord], bool]
    value: Callable[[RunRecord], str]
    compare_unused_keys: bool = False


def _granularity(run: RunRecord) -> str:
    options = run.get("truncation.granularity.options") or {}
    extra = ", ".join(f"{k}={_show(v)}" for k, v in sorted(options.items()))
    return f"{run.get('truncation.granularity.name')}" + (f" ({extra})" if extra else "")


def _adaptive(run: RunRecord) -> bool:
    return run.truncation_mode == "adaptive"


KNOBS: tuple[Knob, ...] = (
    Knob("granularity", "Granularity", ("truncation.granularity",), lambda r: r.truncation_mode != "none", _granularity),
    Knob("search", "Search", ("truncation.search",), _adaptive, lambda r: str(r.get("truncation.search.name"))),
    Knob("judge_mode", "Judge mode", ("truncation.judge.mode",), _adaptive, lambda r: str(r.get("truncation.judge.mode"))),
    Knob("judge_prompt", "Judge prompt", ("truncation.judge_prompt",), _adaptive,
         lambda r: str(r.get("truncation.judge_prompt.name"))),
    Knob("judge_model", "Judge model", ("truncation.judge.model",), _adaptive,
         lambda r: str(r.get("truncation.judge.model.name"))),
    Knob("ratio", "Ratio", ("baseline.ratio",), lambda r: r.truncation_mode == "fixed_ratio", lambda r: _show(r.get("baseline.ratio"))),
    Knob("baseline", "Baseline", ("baseline",), lambda r: r.baseline in ALIGNMENT_BASELINES, lambda r: r.baseline,
         compare_unused_keys=True),
)
"""The ablation axes, in table order."""


def _differences(runs: Sequence[RunRecord]) -> list[list[str]]:
    """Per run, `key=value` parts naming where it departs from the other runs (same baseline).

    Each config aspect that varies (a knob, a config group's name, else a single key) is named
    for the runs whose value is not the most common one; when no value is the most common (two
    runs, two values), every run names it.
    """
    flats = [_identity(run) for run in runs]
    keys = sorted(set().union(*flats))
    differing = [k for k in keys if len({_canonical(flat.get(k)) for flat in flats}) > 1]
    aspects: list[tuple[str, list[str]]] = []
    covered: set[str] = set()
    for knob in KNOBS:
        if knob.name == "baseline":
            continue  # every run here has the same baseline; its other keys are named below
        owned = [k for k in differing if _owned(k, knob.owns) and k not in covered]
        if owned:
            covered.update(owned)
            aspects.append((knob.name, [knob.value(run) for run in runs]))
    rest = [k for k in differing if k not in covered]
    named_groups = sorted({k.split(".")[0] for k in rest if k.count(".") == 1 and k.endswith(".name")})
    for group in named_groups:
        aspects.append((group, [_show(run.get(group + ".name")) for run in runs]))
    for key in rest:
        if key.split(".")[0] not in named_groups:
            aspects.append((key, [_show(flat.get(key)) for flat in flats]))
    labels: list[list[str]] = [[] for _ in runs]
    for name, values in aspects:
        counts = sorted(((values.count(v), v) for v in set(values)), reverse=True)
        usual = counts[0][1] if len(counts) == 1 or counts[0][0] > counts[1][0] else None
        for parts, value in zip(labels, values):
            if value != usual:
                parts.append(f"{name}={value}")
    return labels


def method_labels(runs: Sequence[RunRecord]) -> dict[str, str]:
    """Run name -> its Method label: the baseline, plus what sets it apart from other runs of the
    same (student, baseline), e.g. `fixed_ratio (ratio=0.25)`."""
    buckets: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        buckets.setdefault((run.student, run.baseline), []).append(run)
    labels: dict[str, str] = {}
    for (_, baseline), bucket in buckets.items():
        if len(bucket) == 1:
            labels[bucket[0].name] = baseline
            continue
        for run, parts in zip(bucket, _differences(bucket)):
            labels[run.name] = f"{baseline} ({', '.join(parts)})" if parts else baseline
        seen: dict[str, int] = {}
        for run in bucket:  # identical configs (e.g. the same run from two sources): name the run
            seen[labels[run.name]] = seen.get(labels[run.name], 0) + 1
        for run in bucket:
            if seen[labels[run.name]] > 1:
                labels[run.name] = f"{labels[run.name]} [{run.name}]"
    return labels


# ---------------------------------------------------------------------------------------------
# Cells


def benchmark_columns(runs: Iterable[RunRecord]) -> tuple[str, ...]:
    """The evaluated benchmarks among Table 1's four, in the paper's order, then any other one."""
    evaluated = {name for run in runs for name in run.benchmarks}
    extra = sorted(evaluated - set(PAPER_BENCHMARKS))
    return tuple(b for b in PAPER_BENCHMARKS if b in evaluated) + tuple(extra)


def average_cells(run: RunRecord, k: int = 3, pass1_key: str = "pass@1") -> tuple[str | None, str | None]:
    """The run's (Avg Pass@1, Avg Pass@k) exactly as Table 1 prints them (None when absent)."""
    _, csv_text = results_table({(run.student, run.baseline): run.benchmarks}, k=k,
                                benchmarks=benchmark_columns([run]), pass1_key=pass1_key)
    row = list(csv.reader(io.StringIO(csv_text)))[1]
    return row[-2] or None, row[-1] or None


def samples_cell(summary: Mapping[str, Any] | None) -> str | None:
    """What one benchmark's cells rest on: `problems×samples`, plus the generation budget."""
    if not summary or "num_problems" not in summary:
        return None
    cell = f"{summary['num_problems']}×{summary.get('num_samples', '?')}"
    return cell + (f" ({summary['max_new_tokens']} tok)" if summary.get("max_new_tokens") else "")


def _ratio(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}"


# ---------------------------------------------------------------------------------------------
# Tables


def _row_order(run: RunRecord, label: str) -> tuple:
    rank = BASELINE_ORDER.index(run.baseline) if run.baseline in BASELINE_ORDER else len(BASELINE_ORDER)
    return run.student, rank, run.baseline, label


def table1(runs: Sequence[RunRecord], k: int = 3, pass1_key: str = "pass@1") -> tuple[str, str]:
    """Table 1 as `(markdown, csv)`: one row per (student, method), the Pass@1/Pass@k cells and
    Avg of `results_table`, then what each cell rests on. The CSV carries the same statement as
    `<BENCH> problems`, `<BENCH> samples` and `<BENCH> max_new_tokens` columns and the run name."""
    labels = method_labels(runs)
    ordered = sorted(runs, key=lambda r: _row_order(r, labels[r.name]))
    columns = benchmark_columns(ordered)
    markdown, csv_text = results_table({(r.student, labels[r.name]): r.benchmarks for r in ordered}, k=k,
                                       benchmarks=columns, pass1_key=pass1_key)
    meaning = "the first sample only (`pass@1_first`)" if pass1_key == "pass@1_first" else "mean correctness over the samples (`pass@1`)"
    markdown += (
        f"\nPass@1: {meaning}; Pass@{k}: at least one of {k} samples correct. Avg: unweighted mean of the row's "
        f"printed cells, as in the paper. {MISSING}: not evaluated (or fewer than {k} samples for Pass@{k}).\n"
        "\nSamples behind each cell (problems × samples per problem, max new tokens):\n\n"
    )
    basis_header = ["Student", "Method", *(display_name(b) for b in columns), "Run"]
    basis_rows = [[r.student, labels[r.name], *(samples_cell(r.benchmarks.get(b)) for b in columns), r.name] for r in ordered]
    markdown += render_table(basis_header, basis_rows, numeric_from=len(basis_header))[0]

    table = list(csv.reader(io.StringIO(csv_text)))
    header = table[0] + [f"{display_name(b)} {field}" for b in columns for field in ("problems", "samples", "max_new_tokens")] + ["Run"]
    rows = []
    for cells, run in zip(table[1:], ordered):
        basis = [run.benchmarks.get(b, {}).get(field) for b in columns for field in ("num_problems", "num_samples", "max_new_tokens")]
        rows.append(cells + [None if v is None else str(v) for v in basis] + [run.name])
    return markdown, render_table(header, rows, numeric_from=2)[1]


def ablation_groups(runs: Sequence[RunRecord], knob: Knob) -> list[list[RunRecord]]:
    """Runs that agree on everything but `knob`, in groups of at least two distinct knob values."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        if not knob.applies(run):
            continue
        identity = _identity(run, used_only=not knob.compare_unused_keys)
        context = _canonical({k: v for k, v in identity.items() if not _owned(k, knob.owns)})
        groups.setdefault(context, []).append(run)
    kept = [group for group in groups.values() if len({knob.value(r) for r in group}) > 1]
    return [sorted(group, key=lambda r: _knob_order(knob, r)) for group in kept]


def _knob_order(knob: Knob, run: RunRecord) -> tuple:
    if knob.name == "baseline":
        return (ALIGNMENT_BASELINES.index(run.baseline), run.name)
    value = knob.value(run)
    try:
        return (0, float(value), run.name)
    except ValueError:
        return (1, value, run.name)


def ablation_table(runs: Sequence[RunRecord], knob: Knob, k: int = 3, pass1_key: str = "pass@1") -> tuple[str, str] | None:
    """One knob's ablation as `(markdown, csv)`, or None when no two runs differ in it alone.

    Columns: the group (runs that agree on everything else), student, baseline, the knob's value,
    mean prefix ratio (truncation), retention % (alignment: continuations kept), Avg Pass@1 and
    Avg Pass@k as Table 1 prints them, what the cells rest on, and the run.
    """
    groups = ablation_groups(runs, knob)
    if not groups:
        return None
    show_baseline = knob.name != "baseline"
    header = ["Group", "Student", *(["Baseline"] if show_baseline else []), knob.header,
              "Mean prefix ratio", "Retention %", "Avg Pass@1", f"Avg Pass@{k}", "Cells (problems×samples)", "Run"]
    rows = []
    for index, group in enumerate(groups, start=1):
        for run in group:
            avg1, avgk = average_cells(run, k, pass1_key)
            cells = "; ".join(f"{display_name(b)} {samples_cell(run.benchmarks[b])}" for b in benchmark_columns([run]) if b in run.benchmarks)
            rows.append([str(index), run.student, *([run.baseline] if show_baseline else []), knob.value(run),
                         _ratio(run.prefix_ratio_mean), _percent(run.retention), avg1, avgk, cells, run.name])
    return render_table(header, rows, numeric_from=header.index("Mean prefix ratio"))


def build_tables(runs: Sequence[RunRecord], pass_k: int = 3, pass1_key: str = "pass@1") -> dict[str, tuple[str, str]]:
    """`{"table1": (markdown, csv), "ablation_<knob>": (markdown, csv), ...}`; an ablation table
    appears only when some runs differ in that knob alone."""
    if not runs:
        raise ValueError("no finished runs to tabulate")
    tables = {"table1": table1(runs, pass_k, pass1_key)}
    for knob in KNOBS:
        table = ablation_table(runs, knob, pass_k, pass1_key)
        if table is not None:
            tables[f"ablation_{knob.name}"] = table
    return tables


def write_tables(tables: Mapping[str, tuple[str, str]], out_dir: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Write `<name>.md` and `<name>.csv` per table (atomically); returns their paths."""
    out_dir = Path(out_dir)
    written = {}
    for name, (markdown, csv_text) in tables.items():
        md_path, csv_path = out_dir / f"{name}.md", out_dir / f"{name}.csv"
        write_text_atomic(md_path, markdown)
        write_text_atomic(csv_path, csv_text)
        written[name] = (md_path, csv_path)
    return written
