"""The paper's tables from finished runs: Table 1 (§7.1) and the ablation tables (§6), with an
interval on every cell, paired differences from a reference row, seeds pooled, and published rows.

Runs come from local run folders (`summary.json` + the resolved `config.yaml`, offline), from the
folders of `stage=grade` (predictions made elsewhere, e.g. the paper authors' released outputs,
graded under a config that says whose they are), or from the W&B API (online, one sweep = one W&B
group). Each becomes a `RunRecord` with the same nested summary schema that `palign.pipeline`
writes, and the per-problem outcomes behind it (the graded predictions, or the W&B per-problem
table), so everything after collection is source-agnostic.

Runs that differ in their seed alone are one row (`pool_seeds`): the mean over seeds, the spread
over seeds, every seed's run listed. Cells are `value [low, high]` in Markdown and separate
columns in CSV; the methods (palign/evaluation/metrics.py, palign/reporting/comparisons.py) and
their resamples and seed are stated under each table.

Table 1 rows are (student, method). Its cells come from `results_table`, the one place that
rounds and averages Pass@k as the paper does; below it, the differences of every row from its
student's reference row (`report.reference`, by default sft_long_cot), and what every cell rests on
(problems x samples per problem, and the generation budget), because a Pass@1 over 2 x 2 samples
and one over 500 x 3 print the same way.

An ablation table compares runs that differ in exactly one knob (granularity, search, judge mode,
judge prompt, judge model, the fixed ratio, or the baseline among palign / prefix_only /
student_only), each arm against the recipe's own value of the knob (`report.ablation_reference`
overrides it). "Differ in exactly one knob" is decided on the config keys that name a run folder
(`palign.runs.run_identity` of the stored config, typed by palign/schema.py) plus the evaluation
settings, with the knob's own keys and the seed left out. The baseline knob compares the identity
of every stage, used or not, so compare baselines with runs launched by the same command line with
only `baseline=` changed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from palign.artifacts.errors import DataFormatError
from palign.artifacts.readers import iter_jsonl, read_json, require_field
from palign.artifacts.writes import write_text_atomic
from palign.evaluation.metrics import Interval, mover_sum
from palign.evaluation.predictions import MISSING, PAPER_BENCHMARKS, display_name, render_table, results_table
from palign.reporting.comparisons import (
    Difference,
    IncomparableRuns,
    Outcomes,
    average_difference,
    outcomes_from_rows,
    paired_difference,
    pool,
)
from palign.reporting.published import PublishedRow, verdict
from palign.schema import Report

log = logging.getLogger(__name__)


BASELINE_ORDER: tuple[str, ...] = (
    "sft_short_cot",
    "sft_long_cot",
    "fixed_ratio",
    "prefix_only",
    "student_only",
    "palign",
)
"""Row order within a student: the baselines first, P-ALIGN last, as in the paper's Table 1."""

ALIGNMENT_BASELINES: tuple[str, ...] = ("prefix_only", "student_only", "palign")
"""The baseline ablation (§6): prefix alone, continuation alone, and both."""

_EVALUATION_KEYS = ("benchmarks", "sampling", "model_path")
"""The evaluation settings that change a Pass@k cell (the grading pool's size does not)."""


@dataclass
class RunRecord:
    """One finished run (or one table row: the runs of one setting, pooled over seeds): its resolved
    config and its summary (the schema of `summary.json`)."""

    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    source: str
    """Where it was read: the run folder, or the W&B run's URL."""
    kind: str = "run"
    """run (trained and evaluated by palign) or graded (predictions graded with stage=grade)."""
    members: tuple[RunRecord, ...] = ()
    """The seeds' runs this row pools (`pool_seeds`); empty for a single run."""
    problem_rows: dict[str, tuple[str, list[tuple[str, list[bool]]]]] | None = field(default=None, repr=False)
    """Per benchmark: (where it was read, [(problem id, per-sample correctness)]), when read with the
    run (a W&B per-problem table, graded files); else read from the run's graded predictions."""
    _identities: dict[bool, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    """`_identity` per `used_only`, computed once (each costs a config compose)."""
    _outcomes: dict[str, Outcomes] | None = field(default=None, repr=False, compare=False)

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
    def seed(self) -> Any:
        return self.get("seed")

    @property
    def runs(self) -> tuple[RunRecord, ...]:
        """The runs behind this row: its seeds' runs, or itself."""
        return self.members or (self,)

    @property
    def runs_cell(self) -> str:
        """The runs behind the row, each with its seed when several."""
        if not self.members:
            return self.name
        return "; ".join(f"{run.name} (seed {run.seed})" for run in self.members)

    def outcomes(self) -> dict[str, Outcomes]:
        """Per benchmark, the per-problem correctness behind the row's cells (pooled over its seeds);
        a benchmark without graded predictions is left out (its cells get no interval), and a
        pooled row has a benchmark only when every seed's run has it."""
        if self._outcomes is None:
            if self.members:
                per_run = [run.outcomes() for run in self.members]
                self._outcomes = {
                    b: pool([o[b] for o in per_run]) for b in self.benchmarks if all(b in o for o in per_run)
                }
            else:
                self._outcomes = {
                    b: outcomes_from_rows(b, self.name, rows, where)
                    for b, (where, rows) in self._problem_rows().items()
                }
        return self._outcomes

    def _problem_rows(self) -> dict[str, tuple[str, list[tuple[str, list[bool]]]]]:
        if self.problem_rows is not None:
            return self.problem_rows
        found = {}
        for benchmark, path in self._graded_files().items():
            rows = []
            for lineno, row in iter_jsonl(path):
                where = f"{path}:{lineno}"
                rows.append((str(require_field(row, "id", where)), list(require_field(row, "correct", where))))
            found[benchmark] = (str(path), rows)
        return found

    def _graded_files(self) -> dict[str, Path]:
        """The evaluation's `<benchmark>.graded.jsonl` files, where the summary recorded them or, when
        the outputs moved, under this run folder's `eval/`."""
        results = (self.summary.get("eval") or {}).get("results")
        if not results:
            return {}
        files = {}
        for benchmark in self.benchmarks:
            name = f"{benchmark}.graded.jsonl"
            candidates = [Path(results) / name]
            if Path(self.source).is_dir():
                candidates += sorted(Path(self.source).glob(f"eval/*/{Path(results).name}/{name}"))
            found = next((path for path in candidates if path.is_file()), None)
            if found is None:
                log.info(
                    "%s: no graded predictions for %s (looked for %s); its cells get no interval",
                    self.name,
                    benchmark,
                    candidates[0],
                )
                continue
            files[benchmark] = found
        return files

    @property
    def baseline(self) -> str:
        return str(self.get("baseline.name", "?"))

    @property
    def prefix_reads(self) -> tuple[str, ...]:
        """The fields of the `truncation` node the run's prefix policy reads (palign/truncation/prefixes.py)."""
        from palign.runs import target_class

        target = self.get("baseline.prefix._target_")
        return target_class(target).reads if target else ()

    def part_name(self, key: str) -> str:
        """A `_target_` part of the run's config (`truncation.granularity`, `truncation.search`) by the name its
        class gives what it makes (a splitter's `name`, a search's `strategy`)."""
        from palign.runs import target_class

        made = target_class(self.get(f"{key}._target_"))
        return str(getattr(made, "name", None) or getattr(made, "strategy", None) or made.__name__)

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
        log.warning(
            "%d run(s) in %s are not evaluated yet and are left out: %s",
            len(unfinished),
            runs_dir,
            ", ".join(unfinished),
        )
    return finished, unfinished


def benchmark_of_file(path: str | os.PathLike, config: Mapping[str, Any]) -> str:
    """The benchmark a graded prediction file counts for: the one benchmark name (the paper's four,
    or one the config evaluates) that is a word of its file name (`palign_qwen25_7b_aime24_outputs`,
    the authors' `aime24-output`), else the file name itself."""
    names = set(PAPER_BENCHMARKS) | set(((config.get("evaluation") or {}).get("benchmarks")) or {})
    stem = Path(path).stem
    matches = sorted(n for n in names if re.search(rf"(?<![0-9a-z]){re.escape(n.lower())}(?![0-9a-z])", stem.lower()))
    return matches[0] if len(matches) == 1 else stem


def collect_graded_runs(graded_dir: str | os.PathLike) -> list[RunRecord]:
    """The prediction files graded by `stage=grade` (each `<graded_dir>/grade-<fp>/` folder), one row
    per config they were graded under (everything but the prediction file and the seed): the paper
    recipe's grading of the authors' AIME24 and AIME25 outputs is one row with both benchmarks. Each
    file counts for the benchmark its name names (`benchmark_of_file`)."""
    graded_dir = Path(graded_dir)
    if not graded_dir.is_dir():
        return []
    groups: dict[str, list[tuple[RunRecord, str, str, dict[str, Any], Path]]] = {}
    for folder in sorted(p for p in graded_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        summary_path, config_path = folder / "summary.json", folder / "config.yaml"
        if not summary_path.is_file() or not config_path.is_file():
            continue
        config = _read_config(config_path)
        for predictions, file_summary in (read_json(summary_path).get("graded") or {}).items():
            local = folder / f"{Path(predictions).stem}.graded.jsonl"  # where grade_stage writes it
            graded = Path(file_summary.get("graded") or local)
            record = RunRecord(folder.name, config, {}, str(folder), kind="graded")
            key = _canonical(_identity(record))
            groups.setdefault(key, []).append(
                (
                    record,
                    predictions,
                    benchmark_of_file(predictions, config),
                    file_summary,
                    graded if graded.is_file() else local,
                )
            )
    records = []
    for pieces in groups.values():
        benchmarks, problem_rows, seen = {}, {}, {}
        for record, predictions, benchmark, file_summary, graded in pieces:
            if benchmark in seen:
                raise DataFormatError(
                    f"{seen[benchmark]} and {predictions}: two graded prediction files count for "
                    f"benchmark '{benchmark}' under the same config ({record.source}); grade one of "
                    "them under another config (e.g. another student= or baseline=) or delete its "
                    "grade folder"
                )
            seen[benchmark] = predictions
            benchmarks[benchmark] = {k: v for k, v in file_summary.items() if k != "graded"}
            rows = []
            for lineno, row in iter_jsonl(graded):
                where = f"{graded}:{lineno}"
                rows.append((str(require_field(row, "id", where)), list(require_field(row, "correct", where))))
            problem_rows[benchmark] = (str(graded), rows)
        first = pieces[0][0]
        name = "+".join(dict.fromkeys(record.name for record, *_ in pieces))
        records.append(
            RunRecord(
                name,
                first.config,
                {"eval": {"benchmarks": benchmarks}},
                first.source,
                kind="graded",
                problem_rows=problem_rows,
            )
        )
    return sorted(records, key=lambda r: r.name)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DataFormatError(
            f"{path}: malformed YAML ({err}); it is the run's resolved config, rewrite it by rerunning the run"
        ) from err
    if not isinstance(config, dict):
        raise DataFormatError(f"{path}: expected a mapping (the run's resolved config), got {type(config).__name__}")
    return config


def summary_from_wandb(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A W&B run summary (`eval/<bench>/pass@1`, `eval/avg_pass@1`, `truncation/...`,
    `alignment/...`) in the nested schema of `summary.json`; a value W&B keeps as `{"last": v}`
    (declared with define_metric) is v. Non-numeric entries (tables, histograms) are dropped; `data`
    and the truncation artifact path are not logged to W&B."""
    summary: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, Mapping) and "last" in value:  # a metric declared with define_metric(summary="last")
            value = value["last"]
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
    import tempfile

    import wandb

    path = f"{entity}/{project}" if entity else project
    finished: list[RunRecord] = []
    unfinished: list[str] = []
    for run in wandb.Api().runs(path, filters={"group": group}, lazy=False):  # config and summary are needed
        if run.job_type in ("report", "grade"):
            # the report's own W&B run, and stage=grade's (no per-problem table: grade folders are read locally)
            continue
        summary = summary_from_wandb(run.summary_metrics)
        if not summary.get("eval", {}).get("benchmarks"):
            unfinished.append(run.id)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            problem_rows = problem_rows_from_wandb(run, Path(tmp))
        # the flat keys palign adds for the W&B UI (`ablation.knob`) and W&B's own are not the schema's
        config = {key: value for key, value in dict(run.config).items() if "." not in key and not key.startswith("_")}
        finished.append(RunRecord(run.id, config, summary, run.url, problem_rows=problem_rows))
    if unfinished:
        log.warning(
            "%d W&B run(s) of %s/%s are not evaluated yet and are left out: %s",
            len(unfinished),
            path,
            group,
            ", ".join(unfinished),
        )
    return sorted(finished, key=lambda r: r.name), sorted(unfinished)


def problem_rows_from_wandb(run, tmp: Path) -> dict[str, tuple[str, list[tuple[str, list[bool]]]]]:
    """A W&B run's per-problem tables (`eval/<benchmark>/problems`, logged by palign/evaluation/harness.py):
    per benchmark, (its W&B path, [(problem id, per-sample correctness)])."""
    found = {}
    for key, value in run.summary_metrics.items():
        parts = key.split("/")
        if (
            len(parts) != 3
            or parts[0] != "eval"
            or parts[2] != "problems"
            or not isinstance(value, Mapping)
            or "path" not in value
        ):
            continue
        local = run.file(value["path"]).download(root=str(tmp), replace=True)
        where = f"{run.url} {value['path']}"
        found[parts[1]] = (
            where,
            problem_rows_from_table(json.loads(Path(local.name).read_text(encoding="utf-8")), where),
        )
    return found


def problem_rows_from_table(table: Mapping[str, Any], where: str) -> list[tuple[str, list[bool]]]:
    """`[(problem id, per-sample correctness)]` from a W&B per-problem table as W&B stores it
    (`{"columns": [...], "data": [[...], ...]}`): its `problem` and `sample correct` ("101") columns."""
    columns = list(table.get("columns") or [])
    missing = [c for c in ("problem", "sample correct") if c not in columns]
    if missing:
        raise DataFormatError(
            f"{where}: the per-problem table has no column(s) {missing} (columns: {columns}); it was "
            "logged by an older palign: evaluate the run again to log it"
        )
    problem, correct = columns.index("problem"), columns.index("sample correct")
    return [(str(row[problem]), [c == "1" for c in str(row[correct])]) for row in table.get("data") or []]


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
        raise DataFormatError(
            f"{run.source}: config does not match palign's schema (written by an older palign?): {err}"
        ) from err
    identity = run_identity(typed, every_stage=not used_only)
    identity.pop("seed", None)  # runs that differ in their seed alone are one setting (pool_seeds)
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


def options_of(run: RunRecord, key: str) -> dict[str, Any]:
    """The options of a `_target_` node of the run's config (its keys but Hydra's)."""
    return {k: v for k, v in (run.get(key) or {}).items() if not (k.startswith("_") and k.endswith("_"))}


def _granularity(run: RunRecord) -> str:
    extra = ", ".join(f"{k}={_show(v)}" for k, v in sorted(options_of(run, "truncation.granularity").items()))
    return run.part_name("truncation.granularity") + (f" ({extra})" if extra else "")


def _reads(part: str) -> Callable[[RunRecord], bool]:
    """Whether a run's prefix policy reads `truncation.<part>` (a knob applies to such runs only)."""
    return lambda run: part in run.prefix_reads


KNOBS: tuple[Knob, ...] = (
    Knob("granularity", "Granularity", ("truncation.granularity",), _reads("granularity"), _granularity),
    Knob("search", "Search", ("truncation.search",), _reads("search"), lambda r: r.part_name("truncation.search")),
    Knob(
        "judge_mode",
        "Judge mode",
        ("truncation.judge.mode",),
        _reads("judge"),
        lambda r: str(r.get("truncation.judge.mode")),
    ),
    Knob(
        "judge_prompt",
        "Judge prompt",
        ("truncation.judge_prompt",),
        _reads("judge_prompt"),
        lambda r: str(r.get("truncation.judge_prompt.name")),
    ),
    Knob(
        "judge_model",
        "Judge model",
        ("truncation.judge.model",),
        _reads("judge"),
        lambda r: str(r.get("truncation.judge.model.name")),
    ),
    Knob(
        "ratio",
        "Ratio",
        ("baseline.prefix.ratio",),
        lambda r: r.get("baseline.prefix.ratio") is not None,
        lambda r: _show(r.get("baseline.prefix.ratio")),
    ),
    Knob(
        "baseline",
        "Baseline",
        ("baseline",),
        lambda r: r.baseline in ALIGNMENT_BASELINES,
        lambda r: r.baseline,
        compare_unused_keys=True,
    ),
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
    same (student, baseline), e.g. `fixed_ratio (ratio=0.25)`; graded predictions say so."""
    buckets: dict[tuple[str, str, str], list[RunRecord]] = {}
    for run in runs:
        buckets.setdefault((run.student, run.baseline, run.kind), []).append(run)
    labels: dict[str, str] = {}
    for (_, baseline, kind), bucket in buckets.items():
        tag = [] if kind == "run" else ["graded predictions"]
        differences = _differences(bucket) if len(bucket) > 1 else [[]]
        for run, parts in zip(bucket, differences):
            labels[run.name] = f"{baseline} ({', '.join(tag + parts)})" if tag + parts else baseline
        seen: dict[str, int] = {}
        for run in bucket:  # identical configs (e.g. the same run from two sources): name the run
            seen[labels[run.name]] = seen.get(labels[run.name], 0) + 1
        for run in bucket:
            if seen[labels[run.name]] > 1:
                labels[run.name] = f"{labels[run.name]} [{run.name}]"
    return labels


# ---------------------------------------------------------------------------------------------
# Seeds


def pool_seeds(runs: Sequence[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """One row per setting: runs that differ in their seed alone (same kind, same identity but the
    seed) become one `RunRecord` whose `members` are the seeds' runs, sorted by seed. Its summary's
    cells are the means over the seeds, with `<metric>_seed_sd` beside each (the standard deviation
    over seeds); truncation and alignment statistics are means too.

    Returns `(rows, notes)`: runs that would pool but evaluated different problems or sample counts
    stay separate rows, and a note says why.
    """
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(_canonical([run.kind, _identity(run)]), []).append(run)
    rows, notes = [], []
    for group in groups.values():
        if len(group) == 1 or len({_canonical(run.seed) for run in group}) < len(group):
            rows += group  # one run, or the same seed twice (the same run from two sources): nothing to pool
            continue
        group = sorted(group, key=lambda r: (_canonical(r.seed), r.name))
        try:
            rows.append(_pooled(group))
        except IncomparableRuns as err:
            notes.append(f"not pooled: {err}")
            rows += group
    return sorted(rows, key=lambda r: r.name), notes


_CELL_KEY = re.compile(r"pass@\d+(_first)?")
"""A summary key that is a cell (pass@1, pass@1_first, pass@k), not its interval's bound."""


def _pooled(group: Sequence[RunRecord]) -> RunRecord:
    first = group[0]
    names = ", ".join(run.name for run in group)
    if len({_canonical(sorted(run.benchmarks)) for run in group}) > 1:
        raise IncomparableRuns(
            f"cannot pool the seeds of {names}: they evaluated different benchmarks "
            + "; ".join(f"{run.name}: {', '.join(sorted(run.benchmarks))}" for run in group)
        )
    for benchmark in first.benchmarks:
        for key, what in (("num_problems", "problems"), ("num_samples", "samples per problem")):
            values = [run.benchmarks[benchmark].get(key) for run in group]
            if len(set(values)) > 1:
                raise IncomparableRuns(
                    f"cannot pool the seeds of {names} on {benchmark}: they evaluated different numbers "
                    f"of {what} ({', '.join(map(str, values))})"
                )
    benchmarks = {}
    for benchmark, cells in first.benchmarks.items():
        pooled = dict(cells)
        for key in cells:
            values = [run.benchmarks[benchmark].get(key) for run in group]
            if _CELL_KEY.fullmatch(key) and all(isinstance(v, (int, float)) for v in values):
                pooled[key] = statistics.fmean(values)
                pooled[f"{key}_seed_sd"] = statistics.stdev(values)
        benchmarks[benchmark] = pooled
    summary = json.loads(json.dumps(first.summary))
    summary.setdefault("eval", {})["benchmarks"] = benchmarks
    for section in ("truncation", "alignment"):
        if all(isinstance(run.summary.get(section), Mapping) for run in group):
            for key in first.summary[section]:
                values = [run.summary[section].get(key) for run in group]
                if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    summary[section][key] = statistics.fmean(values)
    pooled = RunRecord(
        "+".join(run.name for run in group), first.config, summary, first.source, kind=first.kind, members=tuple(group)
    )
    pooled.outcomes()  # refuses seeds whose graded problems differ, now rather than in a table
    return pooled


# ---------------------------------------------------------------------------------------------
# Cells


def benchmark_columns(runs: Iterable[RunRecord]) -> tuple[str, ...]:
    """The evaluated benchmarks among Table 1's four, in the paper's order, then any other one."""
    evaluated = {name for run in runs for name in run.benchmarks}
    extra = sorted(evaluated - set(PAPER_BENCHMARKS))
    return tuple(b for b in PAPER_BENCHMARKS if b in evaluated) + tuple(extra)


def average_cells(run: RunRecord, k: int = 3, pass1_key: str = "pass@1") -> tuple[str | None, str | None]:
    """The run's (Avg Pass@1, Avg Pass@k) exactly as Table 1 prints them (None when absent)."""
    _, csv_text = results_table(
        {(run.student, run.baseline): run.benchmarks}, k=k, benchmarks=benchmark_columns([run]), pass1_key=pass1_key
    )
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


def _one(value: float) -> str:
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text


def _two(value: float) -> str:
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


@dataclass
class RowCells:
    """One table row's cells: per (benchmark or `avg`, metric), the printed value, its interval and its
    spread over seeds; per the same key, the difference from the row's reference (or a refusal)."""

    values: dict[tuple[str, str], str | None]
    intervals: dict[tuple[str, str], Interval | None]
    seed_sd: dict[tuple[str, str], float | None]
    differences: dict[tuple[str, str], Difference | str | None] = field(default_factory=dict)
    """A Difference; `ref` for the reference row itself; a refusal's text; None: not compared."""

    def cell(self, key: tuple[str, str]) -> str | None:
        """`49.40 [44.6, 54.2]`, with `sd 1.3` for a row pooled over seeds (the value alone when no
        per-problem outcomes were found)."""
        value = self.values.get(key)
        if value is None:
            return None
        interval, sd = self.intervals.get(key), self.seed_sd.get(key)
        text = value if interval is None else f"{value} [{_one(interval.low)}, {_one(interval.high)}]"
        return text if sd is None else f"{text} sd {_one(sd)}"

    def difference_cell(self, key: tuple[str, str]) -> str | None:
        """`+6.67 [-3.3, 16.7] p=0.25`, `*` at the end where marked; `ref`, `refused` or None."""
        diff = self.differences.get(key)
        if diff is None or diff == "ref":
            return diff
        if isinstance(diff, str):
            return "refused"
        return f"{diff.delta:+.2f} [{_one(diff.interval.low)}, {_one(diff.interval.high)}] p={diff.p_value:.2g}" + (
            " *" if diff.marked else ""
        )

    def csv_cells(self, key: tuple[str, str]) -> list[str | None]:
        """value, ci_low, ci_high, seed_sd."""
        interval, sd = self.intervals.get(key), self.seed_sd.get(key)
        bounds = (None, None) if interval is None else (_two(interval.low), _two(interval.high))
        return [self.values.get(key), *bounds, None if sd is None else _two(sd)]

    def csv_difference(self, key: tuple[str, str]) -> list[str | None]:
        """delta, ci_low, ci_high, p (`ref` or `refused` in the delta column)."""
        diff = self.differences.get(key)
        if not isinstance(diff, Difference):
            return [self.difference_cell(key), None, None, None]
        return [f"{diff.delta:+.2f}", _two(diff.interval.low), _two(diff.interval.high), f"{diff.p_value:.4g}"]


def metric_keys(report: Report, k: int) -> tuple[str, str]:
    """The summary keys of the two columns per benchmark: Pass@1 (report.pass1) and Pass@k."""
    return report.pass1, f"pass@{k}"


def metric_label(metric: str) -> str:
    return "Pass@1" if metric.startswith("pass@1") else metric.replace("pass@", "Pass@")


def row_cells(run: RunRecord, columns: Sequence[str], k: int, report: Report) -> RowCells:
    """The row's printed values (as `results_table` prints them: the paper's rounding and Avg), the
    interval of each from its per-problem outcomes, and the spread over its seeds."""
    metrics = metric_keys(report, k)
    _, csv_text = results_table(
        {(run.student, run.baseline): run.benchmarks}, k=k, benchmarks=columns, pass1_key=report.pass1
    )
    printed = list(csv.reader(io.StringIO(csv_text)))[1][2:]
    keys = [(b, m) for b in columns for m in metrics] + [("avg", m) for m in metrics]
    values = {key: cell or None for key, cell in zip(keys, printed)}
    outcomes = run.outcomes()
    intervals: dict[tuple[str, str], Interval | None] = {}
    seed_sd: dict[tuple[str, str], float | None] = {}
    for benchmark in columns:
        for metric in metrics:
            key = (benchmark, metric)
            present = values[key] is not None and benchmark in outcomes
            intervals[key] = outcomes[benchmark].interval(metric, report.intervals) if present else None
            seed_sd[key] = (
                run.benchmarks.get(benchmark, {}).get(f"{metric}_seed_sd") if values[key] is not None else None
            )
    for metric in metrics:
        shown = [b for b in columns if values[(b, metric)] is not None]
        if shown and all(intervals[(b, metric)] is not None for b in shown):
            exact = [outcomes[b].value(metric) for b in shown]
            intervals[("avg", metric)] = mover_sum(exact, [intervals[(b, metric)] for b in shown], 1.0 / len(shown))
        else:
            intervals[("avg", metric)] = None
        seed_sd[("avg", metric)] = None
        if run.members and values[("avg", metric)] is not None:
            per_seed = [row_cells(member, columns, k, report).values[("avg", metric)] for member in run.members]
            if all(v is not None for v in per_seed):
                seed_sd[("avg", metric)] = statistics.stdev(float(v) for v in per_seed)
    return RowCells(values, intervals, seed_sd)


def compare_rows(
    row: RunRecord, reference: RunRecord, columns: Sequence[str], k: int, report: Report
) -> tuple[dict[tuple[str, str], Difference | str | None], list[str]]:
    """`row` minus `reference` per (benchmark or `avg`, metric) on the problems both evaluated, and the
    refusals' messages (runs that evaluated different problems or sample counts, or benchmarks)."""
    metrics = metric_keys(report, k)
    mine, theirs = row.outcomes(), reference.outcomes()
    differences: dict[tuple[str, str], Difference | str | None] = {}
    refusals: list[str] = []
    for metric in metrics:
        shared = [
            b for b in columns if metric in row.benchmarks.get(b, {}) and metric in reference.benchmarks.get(b, {})
        ]
        for benchmark in shared:
            if benchmark not in mine or benchmark not in theirs:
                continue  # no per-problem outcomes: nothing to pair
            try:
                differences[(benchmark, metric)] = paired_difference(
                    mine[benchmark], theirs[benchmark], metric, report.intervals
                )
            except IncomparableRuns as err:
                differences[(benchmark, metric)] = str(err)
                refusals.append(str(err))
        own = [b for b in columns if metric in row.benchmarks.get(b, {})]
        other = [b for b in columns if metric in reference.benchmarks.get(b, {})]
        refused = [differences[(b, metric)] for b in own if isinstance(differences.get((b, metric)), str)]
        if refused:
            differences[("avg", metric)] = refused[0]  # a benchmark's comparison was refused: so is the Avg's
        elif own != other:
            message = (
                f"cannot compare the Avg {metric_label(metric)} of {row.name} and {reference.name}: they evaluated "
                f"different benchmarks ({', '.join(own) or 'none'} and {', '.join(other) or 'none'})"
            )
            differences[("avg", metric)] = message
            refusals.append(message)
        elif own and all(isinstance(differences.get((b, metric)), Difference) for b in own):
            differences[("avg", metric)] = average_difference(
                [mine[b] for b in own], [theirs[b] for b in own], metric, report.intervals
            )
    return differences, list(dict.fromkeys(refusals))


class ForestRow(NamedTuple):
    """One line of a forest plot: a compared row's label, the column (a benchmark or Avg), the metric."""

    label: str
    column: str
    metric: str
    difference: Difference


class Table(NamedTuple):
    """A table as Markdown (with its notes) and CSV, and the differences its forest plot draws."""

    markdown: str
    csv: str
    forest: tuple[ForestRow, ...] = ()
    reference: str | None = None
    """What the differences are taken from (the forest plot's title)."""


def intervals_note(report: Report, pooled: bool) -> str:
    """The methods, resamples and seed behind a table's intervals and differences."""
    level = f"{100 * report.intervals.confidence_level:g}%"
    note = (
        f"Cells: value [{level} interval]. Intervals: BCa bootstrap over problems (scipy.stats.bootstrap, "
        f"{report.intervals.resamples} resamples, seed {report.intervals.seed}); Wilson score interval over problems "
        "where every problem scored the same (all wrong or all right); Avg: MOVER over the benchmarks' intervals. "
        "A cell without an interval has no graded predictions to resample."
    )
    if pooled:
        note += (
            " sd: standard deviation of the cell over the seeds of a row pooled over seeds (its runs are listed below)."
        )
    return note


def differences_note(report: Report, reference: str) -> str:
    level = f"{100 * report.intervals.confidence_level:g}%"
    alpha = f"{1 - report.intervals.confidence_level:.2g}"
    return (
        f"Δ: the row minus {reference}, in points, over the problems both evaluated: the mean per-problem "
        f"difference [{level} BCa bootstrap interval over problems] and the two-sided p-value of the paired sign-flip "
        f"permutation test (scipy.stats.permutation_test, {report.intervals.resamples} resamples, seed "
        f"{report.intervals.seed}; exact for up to {report.intervals.resamples.bit_length() - 1} problems); Avg: MOVER "
        f"over the benchmarks, p from the permutation test stratified by benchmark. * marks an interval that excludes "
        f"0 with p < {alpha}. ref: the reference row; refused: runs that evaluated different problems, sample counts "
        "or benchmarks (below)."
    )


def _rests_on(
    label: str, reference_label: str, differences: Mapping[tuple[str, str], Any], columns: Sequence[str], metric: str
) -> str | None:
    parts = [
        f"{display_name(b)} {differences[(b, metric)].problems}"
        for b in columns
        if isinstance(differences.get((b, metric)), Difference)
    ]
    return f"{label} vs {reference_label}: {', '.join(parts)} problems" if parts else None


def _diff_table(
    rows: Sequence[tuple[list[str], RowCells]], lead: list[str], columns: Sequence[str], metrics: Sequence[str]
) -> str:
    """The per-benchmark differences: the lead columns, then Δ per benchmark and metric, then Avg."""
    header = [
        *lead,
        *(f"{display_name(b)} Δ{metric_label(m)}" for b in columns for m in metrics),
        *(f"Avg Δ{metric_label(m)}" for m in metrics),
    ]
    body = [
        [
            *cells_lead,
            *(cells.difference_cell((b, m)) for b in columns for m in metrics),
            *(cells.difference_cell(("avg", m)) for m in metrics),
        ]
        for cells_lead, cells in rows
    ]
    return render_table(header, body, numeric_from=len(lead))[0]


# ---------------------------------------------------------------------------------------------
# Tables


def _row_order(run: RunRecord, label: str) -> tuple:
    rank = BASELINE_ORDER.index(run.baseline) if run.baseline in BASELINE_ORDER else len(BASELINE_ORDER)
    return run.student, rank, run.kind, run.baseline, label


def _table1_reference(student_rows: Sequence[RunRecord], labels: Mapping[str, str], reference: str) -> RunRecord | None:
    """The student's reference row: its run of the reference baseline (the one labelled by the baseline
    alone when there are several, else the first in table order)."""
    candidates = [r for r in student_rows if r.baseline == reference and r.kind == "run"] or [
        r for r in student_rows if r.baseline == reference
    ]
    plain = [r for r in candidates if labels[r.name] == reference]
    return (plain or candidates or [None])[0]


def table1(
    runs: Sequence[RunRecord], report: Report | None = None, k: int = 3, published: Sequence[PublishedRow] = ()
) -> Table:
    """Table 1: one row per (student, method) with Pass@1 and Pass@k per benchmark and Avg, each with
    its interval, the Avg differences from the student's reference row (`report.reference`), the
    published rows of the report's students; then the notes, the per-benchmark differences and what
    each cell rests on (problems × samples per problem, the generation budget and the runs). The CSV
    has every value, interval bound, spread, difference and p-value in a column of its own."""
    report = report or Report()
    metrics = metric_keys(report, k)
    labels = method_labels(runs)
    ordered = sorted(runs, key=lambda r: _row_order(r, labels[r.name]))
    columns = benchmark_columns(ordered)
    cells = {run.name: row_cells(run, columns, k, report) for run in ordered}
    refusals: list[str] = []
    rests_on: list[str] = []
    references: dict[str, RunRecord] = {}
    for student in dict.fromkeys(r.student for r in ordered):
        mine = [r for r in ordered if r.student == student]
        reference = _table1_reference(mine, labels, report.reference)
        if reference is None or len(mine) < 2:
            continue
        references[student] = reference
        for run in mine:
            if run is reference:
                cells[run.name].differences = {
                    (c, m): "ref"
                    for c in (*columns, "avg")
                    for m in metrics
                    if cells[run.name].values.get((c, m)) is not None
                }
                continue
            cells[run.name].differences, refused = compare_rows(run, reference, columns, k, report)
            refusals += refused
            line = _rests_on(labels[run.name], labels[reference.name], cells[run.name].differences, columns, metrics[0])
            rests_on += [line] if line else []
    compared = bool(references)
    keys = [(b, m) for b in columns for m in metrics] + [("avg", m) for m in metrics]
    shown_published = [p for p in published if p.student in {r.student for r in ordered}]

    header = [
        "Student",
        "Method",
        *(f"{display_name(b)} {metric_label(m)}" for b, m in keys[:-2]),
        *(f"Avg {metric_label(m)}" for m in metrics),
        *([f"Δ Avg {metric_label(m)}" for m in metrics] if compared else []),
    ]
    body: list[list[str | None]] = []
    csv_header = ["Student", "Method"]
    for b, m in keys:
        name = f"{display_name(b) if b != 'avg' else 'Avg'} {metric_label(m)}"
        csv_header += [name, f"{name} ci_low", f"{name} ci_high", f"{name} seed_sd"]
    if compared:
        for b, m in keys:
            name = f"Δ {display_name(b) if b != 'avg' else 'Avg'} {metric_label(m)}"
            csv_header += [name, f"{name} ci_low", f"{name} ci_high", f"{name} p"]
    csv_header += [f"{display_name(b)} {field}" for b in columns for field in ("problems", "samples", "max_new_tokens")]
    csv_header += ["Run"]
    csv_body: list[list[str | None]] = []
    last_of_student = {run.student: run.name for run in ordered}  # published rows follow their student's runs
    for run in ordered:
        row = cells[run.name]
        body.append(
            [
                run.student,
                labels[run.name],
                *(row.cell(key) for key in keys),
                *([row.difference_cell(("avg", m)) for m in metrics] if compared else []),
            ]
        )
        basis = [
            run.benchmarks.get(b, {}).get(f) for b in columns for f in ("num_problems", "num_samples", "max_new_tokens")
        ]
        csv_body.append(
            [
                run.student,
                labels[run.name],
                *(c for key in keys for c in row.csv_cells(key)),
                *([c for key in keys for c in row.csv_difference(key)] if compared else []),
                *(None if v is None else str(v) for v in basis),
                run.runs_cell,
            ]
        )
        for pub in shown_published:
            if pub.student == run.student and last_of_student[run.student] == run.name:
                body.append(_published_row(pub, keys, compared))
                csv_body.append(_published_csv(pub, keys, compared, len(columns)))
    markdown = render_table(header, body, numeric_from=2)[0]
    meaning = (
        "the first sample only (`pass@1_first`)"
        if report.pass1 == "pass@1_first"
        else "mean correctness over the samples (`pass@1`)"
    )
    notes = [
        f"Pass@1: {meaning}; Pass@{k}: at least one of {k} samples correct. Avg: unweighted mean of the row's "
        f"printed cells, as in the paper. {MISSING}: not evaluated (or fewer than {k} samples for Pass@{k}).",
        intervals_note(report, any(r.members for r in ordered)),
    ]
    if compared:
        notes.append(differences_note(report, f"its student's {report.reference} row"))
    if shown_published:
        notes.append(
            "Published rows (no interval: the numbers as printed): "
            + "; ".join(f"{p.name}: {p.source}" for p in shown_published)
            + ". See the reproduction table."
        )
    missing = [p.name for p in published if p not in shown_published]
    if missing:
        notes.append(f"Published rows without a run of their student here, not shown: {', '.join(missing)}.")
    markdown += "\n" + "\n\n".join(notes) + "\n"
    forest: list[ForestRow] = []
    if compared:
        markdown += f"\nPaired differences from {report.reference}, per benchmark:\n\n"
        compared_rows = [r for r in ordered if r.student in references and r is not references[r.student]]
        markdown += _diff_table(
            [([r.student, labels[r.name]], cells[r.name]) for r in compared_rows],
            ["Student", "Method"],
            columns,
            metrics,
        )
        if rests_on:
            markdown += "\nProblems each comparison rests on: " + "; ".join(rests_on) + ".\n"
        if refusals:
            markdown += "\nNot compared: " + " ".join(f"{text}." for text in dict.fromkeys(refusals)) + "\n"
        for run in compared_rows:
            label = labels[run.name] if len(references) == 1 else f"{run.student} {labels[run.name]}"
            forest += _forest_rows(label, cells[run.name], columns, metrics)
    markdown += "\nSamples behind each cell (problems × samples per problem, max new tokens), and the runs:\n\n"
    basis_header = ["Student", "Method", *(display_name(b) for b in columns), "Run"]
    basis_rows = [
        [r.student, labels[r.name], *(samples_cell(r.benchmarks.get(b)) for b in columns), r.runs_cell] for r in ordered
    ]
    markdown += render_table(basis_header, basis_rows, numeric_from=len(basis_header))[0]
    return Table(markdown, render_table(csv_header, csv_body, numeric_from=2)[1], tuple(forest), report.reference)


def _published_row(pub: PublishedRow, keys: Sequence[tuple[str, str]], compared: bool) -> list[str | None]:
    metrics = list(dict.fromkeys(m for _, m in keys))
    values = [_published_value(pub, b, m, metrics) for b, m in keys]
    return [pub.student, f"{pub.method} [published: {pub.name}]", *values, *([None, None] if compared else [])]


def _published_csv(
    pub: PublishedRow, keys: Sequence[tuple[str, str]], compared: bool, columns: int
) -> list[str | None]:
    metrics = list(dict.fromkeys(m for _, m in keys))
    cells: list[str | None] = [pub.student, f"{pub.method} [published: {pub.name}]"]
    for b, m in keys:
        cells += [_published_value(pub, b, m, metrics), None, None, None]
    return cells + ([None] * 4 * len(keys) if compared else []) + [None] * 3 * columns + [f"published: {pub.name}"]


def _published_metric(metric: str, metrics: Sequence[str]) -> str:
    """The published file's key for a column: `pass@1` for the Pass@1 column whichever reading it uses."""
    return "pass@1" if metric == metrics[0] else metric


def _published_value(pub: PublishedRow, benchmark: str, metric: str, metrics: Sequence[str]) -> str | None:
    value = pub.value(_published_metric(metric, metrics), benchmark)
    return None if value is None else _two(value)


def reproduction_table(
    runs: Sequence[RunRecord], published: Sequence[PublishedRow], report: Report | None = None, k: int = 3
) -> Table | None:
    """Each published row beside the runs of its student and method: per cell the published value,
    the run's value and interval, and whether the published value lies inside it (reproduced), below
    or above it (palign/reporting/published.py). None when no run matches a published row."""
    report = report or Report()
    metrics = metric_keys(report, k)
    labels = method_labels(runs)
    pairs = [
        (pub, run)
        for pub in published
        for run in sorted(runs, key=lambda r: _row_order(r, labels[r.name]))
        if run.student == pub.student and run.baseline == pub.method
    ]
    if not pairs:
        return None
    columns = benchmark_columns([run for _, run in pairs])
    header = ["Published", "Student", "Method", "Run", "Metric", *(display_name(b) for b in columns), "Avg"]
    body, csv_body = [], []
    for pub, run in pairs:
        cells = row_cells(run, columns, k, report)
        same_benchmarks = set(run.benchmarks) == pub.benchmarks
        for metric in metrics:
            published_key = _published_metric(metric, metrics)
            md, flat = [], []
            for column in (*columns, "avg"):
                value = pub.value(published_key, column)
                interval = cells.intervals.get((column, metric))
                if value is None or interval is None or (column == "avg" and not same_benchmarks):
                    md.append(None)
                    flat.append(None)
                    continue
                said = verdict(value, interval.low, interval.high)
                md.append(
                    f"{said}: {_two(value)} vs {cells.values[(column, metric)]} "
                    f"[{_one(interval.low)}, {_one(interval.high)}]"
                )
                flat.append(said)
            label = (
                f"{metric_label(metric)} ({published_key} published)"
                if published_key != metric
                else metric_label(metric)
            )
            body.append([pub.name, run.student, labels[run.name], run.runs_cell, label, *md])
            csv_body.append([pub.name, run.student, labels[run.name], run.runs_cell, label, *flat])
    level = f"{100 * report.intervals.confidence_level:g}%"
    markdown = render_table(header, body, numeric_from=5)[0]
    markdown += (
        f"\nEach cell: the published value, then the run's value [{level} interval]: reproduced when the published "
        "value lies inside the interval (to its printed two decimals), below when it lies under it (the run did "
        "better), above when over it (the run did worse). Avg is compared only when the run evaluated the "
        "published row's benchmarks. "
        + intervals_note(report, any(run.members for _, run in pairs))
        + "\n\n"
        + "\n".join(f"- {pub.name}: {pub.source}" for pub in {p.name: p for p, _ in pairs}.values())
        + "\n"
    )
    return Table(markdown, render_table(header, csv_body, numeric_from=5)[1])


def _forest_rows(label: str, cells: RowCells, columns: Sequence[str], metrics: Sequence[str]) -> list[ForestRow]:
    return [
        ForestRow(label, display_name(c) if c != "avg" else "Avg", metric_label(m), diff)
        for c in (*columns, "avg")
        for m in metrics
        if isinstance(diff := cells.differences.get((c, m)), Difference)
    ]


def ablation_groups(runs: Sequence[RunRecord], knob: Knob) -> list[list[RunRecord]]:
    """Runs that agree on everything but `knob`, in groups of at least two distinct knob values."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        if not knob.applies(run):
            continue
        identity = _identity(run, used_only=not knob.compare_unused_keys)
        context = _canonical([run.kind, {k: v for k, v in identity.items() if not _owned(k, knob.owns)}])
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


def ablation_reference(
    group: Sequence[RunRecord], knob: Knob, report: Report, recipe: RunRecord | None
) -> tuple[RunRecord, str]:
    """The arm a group's other arms are compared with, and why: `report.ablation_reference[knob]`, else
    the recipe's own value of the knob (the report's config), else the group's first arm."""
    wanted, why = report.ablation_reference.get(knob.name), f"report.ablation_reference.{knob.name}"
    if wanted is None and recipe is not None:
        wanted, why = knob.value(recipe), "the recipe's own value"
    for run in group:
        if wanted is not None and knob.value(run) == str(wanted):
            return run, f"{knob.value(run)} ({why})"
    return group[0], f"{knob.value(group[0])} (the first arm: no arm has " + (
        f"{knob.header.lower()} {wanted}, {why})" if wanted is not None else "a recipe value)"
    )


def ablation_table(
    runs: Sequence[RunRecord], knob: Knob, report: Report | None = None, k: int = 3, recipe: RunRecord | None = None
) -> Table | None:
    """One knob's ablation, or None when no two runs differ in it alone.

    Columns: the group (runs that agree on everything else), student, baseline, the knob's value,
    mean prefix ratio (truncation), retention % (alignment: continuations kept), Avg Pass@1 and
    Avg Pass@k with their intervals, their differences from the group's reference arm
    (`ablation_reference`), what the cells rest on, and the runs; then the per-benchmark differences.
    """
    report = report or Report()
    metrics = metric_keys(report, k)
    groups = ablation_groups(runs, knob)
    if not groups:
        return None
    show_baseline = knob.name != "baseline"
    columns = benchmark_columns([run for group in groups for run in group])
    header = [
        "Group",
        "Student",
        *(["Baseline"] if show_baseline else []),
        knob.header,
        "Mean prefix ratio",
        "Retention %",
        *(f"Avg {metric_label(m)}" for m in metrics),
        *(f"Δ Avg {metric_label(m)}" for m in metrics),
        "Cells (problems×samples)",
        "Run",
    ]
    csv_header = [*header[: header.index("Avg Pass@1")]]
    for m in metrics:
        name = f"Avg {metric_label(m)}"
        csv_header += [name, f"{name} ci_low", f"{name} ci_high", f"{name} seed_sd"]
    for m in metrics:
        name = f"Δ Avg {metric_label(m)}"
        csv_header += [name, f"{name} ci_low", f"{name} ci_high", f"{name} p"]
    csv_header += ["Cells (problems×samples)", "Run"]
    rows, csv_rows, diff_rows, forest, notes, refusals, rests_on = [], [], [], [], [], [], []
    for index, group in enumerate(groups, start=1):
        reference, why = ablation_reference(group, knob, report, recipe)
        notes.append(f"group {index}: {why}")
        for run in group:
            own = benchmark_columns([run])
            cells = row_cells(run, own, k, report)
            if run is reference:
                cells.differences = {("avg", m): "ref" for m in metrics if cells.values.get(("avg", m)) is not None}
            else:
                cells.differences, refused = compare_rows(run, reference, own, k, report)
                refusals += refused
                diff_rows.append(([str(index), run.student, knob.value(run)], cells))
                line = _rests_on(
                    f"group {index} {knob.value(run)}", knob.value(reference), cells.differences, own, metrics[0]
                )
                rests_on += [line] if line else []
                forest += _forest_rows(
                    f"{knob.value(run)} (group {index})" if len(groups) > 1 else knob.value(run), cells, own, metrics
                )
            basis = "; ".join(
                f"{display_name(b)} {samples_cell(run.benchmarks[b])}" for b in own if b in run.benchmarks
            )
            lead = [
                str(index),
                run.student,
                *([run.baseline] if show_baseline else []),
                knob.value(run),
                _ratio(run.prefix_ratio_mean),
                _percent(run.retention),
            ]
            rows.append(
                [
                    *lead,
                    *(cells.cell(("avg", m)) for m in metrics),
                    *(cells.difference_cell(("avg", m)) for m in metrics),
                    basis,
                    run.runs_cell,
                ]
            )
            csv_rows.append(
                [
                    *lead,
                    *(c for m in metrics for c in cells.csv_cells(("avg", m))),
                    *(c for m in metrics for c in cells.csv_difference(("avg", m))),
                    basis,
                    run.runs_cell,
                ]
            )
    markdown = render_table(header, rows, numeric_from=header.index("Mean prefix ratio"))[0]
    markdown += (
        "\n"
        + "\n\n".join(
            [
                intervals_note(report, any(run.members for group in groups for run in group)),
                differences_note(report, "its group's reference arm") + " Reference arms: " + "; ".join(notes) + ".",
            ]
        )
        + "\n"
    )
    if diff_rows:
        markdown += "\nPaired differences from each group's reference arm, per benchmark:\n\n"
        markdown += _diff_table(diff_rows, ["Group", "Student", knob.header], columns, metrics)
    if rests_on:
        markdown += "\nProblems each comparison rests on: " + "; ".join(rests_on) + ".\n"
    if refusals:
        markdown += "\nNot compared: " + " ".join(f"{text}." for text in dict.fromkeys(refusals)) + "\n"
    csv_text = render_table(csv_header, csv_rows, numeric_from=header.index("Mean prefix ratio"))[1]
    return Table(markdown, csv_text, tuple(forest), f"each group's reference {knob.header.lower()}")


def build_tables(
    runs: Sequence[RunRecord],
    report: Report | None = None,
    pass_k: int = 3,
    published: Sequence[PublishedRow] = (),
    recipe: RunRecord | None = None,
) -> dict[str, Table]:
    """`{"table1": Table, "reproduction": Table (with published rows that match a run),
    "ablation_<knob>": Table, ...}`; an ablation table appears only when some runs differ in that knob
    alone. `runs` are table rows (`pool_seeds` pools seeds first); `recipe` is the report's own config
    as a record (the recipe's value of each ablation knob)."""
    if not runs:
        raise ValueError("no finished runs to tabulate")
    report = report or Report()
    tables = {"table1": table1(runs, report, pass_k, published)}
    reproduction = reproduction_table(runs, published, report, pass_k)
    if reproduction is not None:
        tables["reproduction"] = reproduction
    for knob in KNOBS:
        table = ablation_table(runs, knob, report, pass_k, recipe)
        if table is not None:
            tables[f"ablation_{knob.name}"] = table
    return tables


def write_tables(tables: Mapping[str, Table], out_dir: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Write `<name>.md` and `<name>.csv` per table (atomically); returns their paths."""
    out_dir = Path(out_dir)
    written = {}
    for name, table in tables.items():
        md_path, csv_path = out_dir / f"{name}.md", out_dir / f"{name}.csv"
        write_text_atomic(md_path, table.markdown)
        write_text_atomic(csv_path, table.csv)
        written[name] = (md_path, csv_path)
    return written
