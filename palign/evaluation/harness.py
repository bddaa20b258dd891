"""Method step 5: evaluate a student on the paper's benchmarks (PAPER.md §3, §7).

For each benchmark (`conf/benchmark/*.yaml`), the student answers the paper's inference prompt
(the instruction plus the problem, through the chat template) with n samples per problem (3 in
the paper, T=0.6, top-p 0.9); predictions are stored per benchmark in the authors' file format
(`answer` plus a list of sampled `output`s), resumable problem by problem, then graded with
math-verify in worker processes with a hard per-item timeout. Metrics: Pass@1 (mean over samples,
and the first-sample variant), Pass@n, the paper's Avg over benchmarks; results as Markdown and
CSV in the Table 1 layout, each cell with its interval (BCa bootstrap over problems, Wilson where
every problem scored the same; palign/evaluation/metrics.py), also in the run summary and in W&B
(`eval/<benchmark>/pass@1_ci_low`, `_ci_high`, declared with define_metric) beside two W&B tables
per benchmark: the predictions (one row per sample, with the benchmark and the gold answer) and the
problems (one row per problem: its samples' correctness, pass@1 and pass@k), on which W&B's table
comparison joins two runs.

Where the outputs go, under a run's `eval/`:

    <predictions key>/                 model (weights by content), sampling, prompts: settings.json
        <benchmark>.jsonl              the predictions, reused by every evaluation with that key
        <benchmark>.graded.jsonl       the latest grading of the problems last evaluated
        <benchmarks>-pass<k>-<key>/    one folder per evaluation setting: the benchmarks as
            evaluation.json            evaluated (limits, held-out ids) and k, so a second
            results.md, results.csv    evaluation with other settings never overwrites a first
            metrics.json
            <benchmark>.graded.jsonl   the per-sample grades of this evaluation's problems

and the run folder keeps a copy of the latest evaluation's results.md, results.csv and
metrics.json (what the pipeline's summary.json `eval` section describes too).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.artifacts.digests import file_digests, fingerprint
from palign.artifacts.readers import read_json
from palign.artifacts.stores import open_stage_store, stage_folder
from palign.artifacts.writes import write_json_atomic, write_jsonl_atomic, write_text_atomic
from palign.evaluation.benchmarks import load_benchmark
from palign.evaluation.metrics import Interval, cell_intervals, mover_sum, problem_scores
from palign.evaluation.predictions import (
    PAPER_BENCHMARKS,
    display_name,
    grade_prediction_file,
    render_table,
    results_table,
)
from palign.grading import GradingPool
from palign.llm.backends import Backend, ChatBackend, build_chat, complete_missing
from palign.llm.chat import instruction_prompt
from palign.llm.generation import SamplingConfig
from palign.llm.hf_backend import LocalChatBackend
from palign.schema import Intervals

log = logging.getLogger(__name__)

# Stored predictions and grades depend on this code as well as on the settings: bump CODE_VERSION
# when a change here changes what is stored, so caches written by older code are never reused
# (tests/integration/test_stage_versions.py notices a change to the logic that did not bump it).
CODE_VERSION = 2  # 2: a Hugging Face reply ends at every eos id of the model's generation_config, as in vLLM


@dataclass
class BenchmarkResult:
    name: str
    summary: dict[str, float]
    predictions: Path
    graded: Path
    rows: list[dict[str, Any]]


def evaluate(
    model_loader: Callable[[], Any],
    model_identity: Mapping[str, Any],
    tokenizer,
    benchmarks: Mapping[str, Mapping[str, Any]],
    sampling: Mapping[str, Any],
    prompts: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    chat_template_kwargs: Mapping[str, Any],
    grading_workers: int,
    grading_timeout_s: float,
    chunk_size: int,
    backend: ChatBackend | None,
) -> dict[str, BenchmarkResult]:
    """Generate (or reuse) predictions for every benchmark, grade them, and return the summaries.

    Predictions live in `<out_dir>/<fingerprint>/<benchmark>.jsonl`; the fingerprint covers the
    model, the sampling settings and the prompt, so changing any of them starts a new folder.
    """
    sampling_cfg = SamplingConfig.from_config(sampling)
    identity = {
        "model": dict(model_identity),
        "sampling": {k: v for k, v in vars(sampling_cfg).items() if k != "batch_size"},
        "prompts": {"instruction": prompts["instruction"], "separator": prompts["question_separator"]},
        "code_version": CODE_VERSION,
    }
    folder = stage_folder(out_dir, identity)
    results: dict[str, BenchmarkResult] = {}
    # e.g. VLLMChatBackend, which brings its own tokenizer and template; by default the Hugging Face
    # model, loaded only when a prediction is missing
    backend = backend or LocalChatBackend(model_loader, tokenizer, chat_template_kwargs)

    with GradingPool(num_workers=grading_workers, timeout_s=grading_timeout_s) as pool:
        for name, bench_cfg in benchmarks.items():
            problems = load_benchmark(**dict(bench_cfg))
            by_id = {p.id: p for p in problems}
            path = folder / f"{name}.jsonl"
            with open_stage_store(folder, identity, name=path.name) as store:

                def save(chunk) -> None:
                    for problem_id, generations in chunk:
                        problem = by_id[problem_id]  # noqa: B023 (save runs within this benchmark's iteration)
                        store.add(
                            {
                                "id": problem.id,
                                "problem": problem.problem,
                                "answer": problem.answer,
                                "output": [g.text for g in generations],
                                "tokens": [g.num_tokens for g in generations],
                                "finished": [g.finished for g in generations],
                            }
                        )

                items = [(p.id, instruction_prompt(prompts, p.problem)) for p in problems]
                complete_missing(
                    backend,
                    items,
                    store.__contains__,
                    sampling_cfg,
                    save,
                    chunk_size=chunk_size,
                    progress=f"eval {name}",
                )
                # the store may hold problems from an earlier, larger limit: grade this run's only
                ordered = [store.get(p.id) for p in problems]
            current = folder / f"{name}.current.jsonl"
            write_jsonl_atomic(current, ordered)
            rows, summary = grade_prediction_file(current, pool)
            for row, prediction in zip(rows, ordered):
                row["output"] = prediction["output"]
                row["tokens"] = prediction["tokens"]
            summary["max_new_tokens"] = sampling_cfg.max_new_tokens
            summary["truncated_rate"] = (
                100.0 * sum(not f for p in ordered for f in p["finished"]) / sum(len(p["finished"]) for p in ordered)
            )
            graded = folder / f"{name}.graded.jsonl"
            write_jsonl_atomic(graded, rows)
            current.unlink()
            results[name] = BenchmarkResult(name, summary, path, graded, rows)
            log.info("%s: %s", name, {k: round(v, 2) if isinstance(v, float) else v for k, v in summary.items()})
    return results


def average(results: Mapping[str, BenchmarkResult], key: str) -> float:
    values = [r.summary[key] for r in results.values() if key in r.summary]
    return sum(values) / len(values) if values else float("nan")


def add_intervals(results: Mapping[str, BenchmarkResult], k: int, settings: Intervals) -> dict[str, float]:
    """Each benchmark's `<metric>_ci_low` / `_ci_high` (percent) into its summary, for pass@1,
    pass@1_first and pass@k; returns the Avg cells with theirs (`avg_pass@1`, `avg_pass@1_ci_low`, ...:
    MOVER over the benchmarks)."""
    metrics = list(dict.fromkeys(("pass@1", "pass@1_first", f"pass@{k}")))
    per_benchmark: dict[str, dict[str, Interval]] = {}
    for name, result in results.items():
        per_benchmark[name] = cell_intervals([row["correct"] for row in result.rows], metrics, settings)
        for metric, interval in per_benchmark[name].items():
            result.summary[f"{metric}_ci_low"], result.summary[f"{metric}_ci_high"] = interval.low, interval.high
    averages = {f"avg_{metric}": average(results, metric) for metric in ("pass@1", f"pass@{k}")}
    for metric in ("pass@1", f"pass@{k}"):
        interval = mover_sum(
            [r.summary[metric] for r in results.values()],
            [per_benchmark[n][metric] for n in results],
            1.0 / len(results),
        )
        averages[f"avg_{metric}_ci_low"], averages[f"avg_{metric}_ci_high"] = interval.low, interval.high
    return averages


def intervals_table(
    results: Mapping[str, BenchmarkResult], k: int, averages: Mapping[str, float], settings: Intervals
) -> str:
    """The results' cells with their intervals (Markdown), and how they were computed."""

    def cell(summary: Mapping[str, float], metric: str, prefix: str = "") -> str:
        value, low, high = (summary[f"{prefix}{metric}{suffix}"] for suffix in ("", "_ci_low", "_ci_high"))
        return f"{value:.2f} [{low:.1f}, {high:.1f}]"

    rows = [
        [display_name(name), cell(r.summary, "pass@1"), cell(r.summary, f"pass@{k}")] for name, r in results.items()
    ]
    rows.append(["Avg", cell(averages, "pass@1", "avg_"), cell(averages, f"pass@{k}", "avg_")])
    level = f"{100 * settings.confidence_level:g}%"
    return (
        render_table(["Benchmark", "Pass@1", f"Pass@{k}"], rows, numeric_from=1)[0]
        + f"\nValue [{level} interval]: BCa bootstrap over problems (scipy.stats.bootstrap, {settings.resamples} "
        f"resamples, seed {settings.seed}); Wilson score interval over problems where every problem scored the same; "
        "Avg: MOVER over the benchmarks (palign/evaluation/metrics.py).\n"
    )


def _with_bounds(csv_text: str, summaries: list[Mapping[str, float]], averages: Mapping[str, float], k: int) -> str:
    """results.csv with a `<column> ci_low` and a `<column> ci_high` column per Pass@ value, after the
    Table 1 columns (which keep their place)."""
    import csv
    import io

    header, row = list(csv.reader(io.StringIO(csv_text)))
    cells = [(summary, "", metric) for summary in summaries for metric in ("pass@1", f"pass@{k}")]
    cells += [(averages, "avg_", metric) for metric in ("pass@1", f"pass@{k}")]
    for name, value, (summary, prefix, metric) in zip(header[2 : len(cells) + 2], row[2:], cells):
        bounds = [summary.get(f"{prefix}{metric}_ci_{end}") for end in ("low", "high")]
        header += [f"{name} ci_low", f"{name} ci_high"]
        row += ["" if b is None or not value else f"{b:.2f}" for b in bounds]
    return render_table(header, [row], numeric_from=2)[1]


def results_folder(results: Mapping[str, BenchmarkResult], benchmarks: Mapping[str, Mapping[str, Any]], k: int) -> Path:
    """The folder of one evaluation setting, beside its predictions (see the module docstring)."""
    if not results:
        raise ValueError("no benchmark results to write; configure at least one of evaluation.benchmarks")
    predictions = {r.predictions.parent for r in results.values()}
    if len(predictions) != 1:
        raise ValueError(
            f"benchmark results from several prediction folders {sorted(map(str, predictions))}; "
            "write each evaluation's own"
        )
    key = fingerprint({"benchmarks": {name: dict(benchmarks[name]) for name in results}, "pass_k": k}, length=8)
    return predictions.pop() / f"{'+'.join(results)}-pass{k}-{key}"


def write_results(
    results: Mapping[str, BenchmarkResult],
    student: str,
    method: str,
    run_dir: str | os.PathLike,
    k: int,
    benchmarks: Mapping[str, Mapping[str, Any]],
    averages: Mapping[str, float] | None = None,
    settings: Intervals | None = None,
) -> tuple[str, Path]:
    """Table 1 layout as Markdown and CSV for one (student, method) row, plus metrics.json, in the
    evaluation setting's own folder and, as the latest, in `run_dir`. Returns (markdown, folder).

    benchmarks: the benchmark configs as evaluated (with their limits and held-out ids).
    averages, settings: with `add_intervals`' bounds in the summaries and in `averages`, results.md
    shows every cell with its interval under the row (`intervals_table`) and results.csv has a
    `ci_low` and a `ci_high` column after each value.
    """
    folder = results_folder(results, benchmarks, k)
    columns = [n for n in PAPER_BENCHMARKS if n in results] + [n for n in results if n not in PAPER_BENCHMARKS]
    markdown, csv_text = results_table(
        {(student, method): {n: r.summary for n, r in results.items()}}, k=k, benchmarks=columns
    )
    if averages is not None and settings is not None:
        markdown += "\n" + intervals_table(results, k, averages, settings)
        csv_text = _with_bounds(csv_text, [results[n].summary for n in columns], averages, k)
    metrics = {n: r.summary for n, r in results.items()}
    predictions = read_json(folder.parent / "settings.json")
    write_json_atomic(
        folder / "evaluation.json",
        {
            "predictions": predictions,
            "benchmarks": {n: dict(benchmarks[n]) for n in results},
            "pass_k": k,
            "student": student,
            "method": method,
        },
    )
    for name, result in results.items():
        write_jsonl_atomic(folder / f"{name}.graded.jsonl", result.rows)
    for where in (folder, Path(run_dir)):
        write_text_atomic(where / "results.md", markdown)
        write_text_atomic(where / "results.csv", csv_text)
        write_json_atomic(where / "metrics.json", metrics)
    return markdown, folder


def evaluate_student(
    benchmarks: Mapping[str, Mapping[str, Any] | None],
    limit: int | None,
    model_path: str | None,
    backend: Backend,
    sampling: Mapping[str, Any],
    pass_k: int,
    grading: Mapping[str, Any],
    chunk_size: int,
    *,
    student: Mapping[str, Any],
    method: str,
    prompts: Mapping[str, Any],
    cache_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    trained: str | os.PathLike,
    training_ids: Callable[[], list[str]],
    tracker,
    intervals: Mapping[str, Any],
) -> dict[str, Any] | None:
    """Stage 4 from the `evaluation` config node (palign/schema.py: Evaluation): the trained student
    in `trained` (or `model_path`, or else the base model) on every configured benchmark; results
    written beside the predictions and in `run_dir`, logged to the run's tracker. Returns the run
    summary's `eval` entry, or None when no benchmark is configured.

    training_ids: the run's training problem ids, read only if a benchmark holds them out.
    intervals: how the cells' intervals are computed (palign/schema.py: Intervals, the run's `report.intervals`).
    backend: the option of conf/backend/ the student generates on (`build_chat`).
    """
    from functools import partial

    from palign.llm.models import ModelSpec, load_inference_model, load_tokenizer

    chosen = {name: dict(bench) for name, bench in benchmarks.items() if bench is not None}
    if not chosen:
        log.info("evaluation: no benchmarks configured; skipping")
        return None
    held_out: list[str] | None = None
    for bench in chosen.values():
        bench["limit"] = min((n for n in (bench["limit"], limit) if n is not None), default=None)
        if bench.pop("exclude_training"):  # held-out problems of the teacher's own data set
            held_out = held_out if held_out is not None else training_ids()
            bench["exclude_ids"] = held_out
    model_path = model_path or (str(trained) if (Path(trained) / "config.json").exists() else None)
    spec = ModelSpec.from_config(student)
    if model_path is None:
        log.warning("no trained student in %s; evaluating the base model %s", trained, spec.name)
    tokenizer = load_tokenizer(spec, cache_dir)
    engine = build_chat(
        backend, "evaluation.backend", spec, cache_dir, tokenizer=tokenizer, weights=model_path, stage="evaluation"
    )
    results = evaluate(
        partial(load_inference_model, spec, cache_dir, path=model_path),
        {"base": spec.identity(), "weights": model_path and file_digests(model_path)},
        tokenizer,
        chosen,
        sampling,
        prompts,
        Path(run_dir) / "eval",
        chat_template_kwargs=spec.chat_template_kwargs,
        grading_workers=grading["workers"],
        grading_timeout_s=grading["timeout_s"],
        chunk_size=chunk_size,
        backend=engine,
    )
    settings = Intervals(**intervals)
    averages = add_intervals(results, pass_k, settings)
    # each evaluation setting keeps its own results beside its predictions; the run folder has the latest
    markdown, folder = write_results(results, spec.name, method, run_dir, pass_k, chosen, averages, settings)
    summaries = {name: r.summary for name, r in results.items()}
    flat = {f"eval/{name}/{key}": v for name, summary in summaries.items() for key, v in summary.items()}
    flat.update({f"eval/{key}": v for key, v in averages.items()})
    tracker.log_final(flat)
    for name, result in results.items():
        log_result_tables(tracker, name, result, pass_k)
    return {
        "benchmarks": summaries,
        **averages,
        "model": model_path or "base",
        "table": markdown,
        "results": str(folder),
    }


def log_result_tables(tracker, name: str, result: BenchmarkResult, k: int) -> None:
    """Two W&B tables per benchmark: `eval/<name>/predictions` (one row per sample: the benchmark, the
    problem id, the gold answer, what was extracted, whether it is correct, the output's end) and
    `eval/<name>/problems` (one row per problem: its samples, how many are correct, which ones as
    `sample correct` ("101": the first and third), its pass@1 and pass@k in percent), on which W&B's
    table comparison joins two runs by problem id."""
    tracker.log_table(
        f"eval/{name}/predictions",
        ["benchmark", "problem", "sample", "gold", "extracted", "correct", "output"],
        [
            [name, row["id"], s, row["answer"], row["extracted"][s], row["correct"][s], row["output"][s][-1000:]]
            for row in result.rows
            for s in range(len(row["correct"]))
        ],
    )
    correct = [row["correct"] for row in result.rows]
    pass1 = problem_scores(correct, "pass@1")
    passk = problem_scores(correct, f"pass@{k}")
    tracker.log_table(
        f"eval/{name}/problems",
        ["benchmark", "problem", "gold", "samples", "correct samples", "sample correct", "pass@1", f"pass@{k}"],
        [
            [
                name,
                row["id"],
                row["answer"],
                len(row["correct"]),
                sum(row["correct"]),
                "".join("1" if c else "0" for c in row["correct"]),
                100.0 * float(p1),
                100.0 * float(pk),
            ]
            for row, p1, pk in zip(result.rows, pass1, passk)
        ],
    )
