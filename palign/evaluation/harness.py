"""Method step 5: evaluate a student on the paper's benchmarks (PAPER.md §3, §7).

For each benchmark (`conf/benchmark/*.yaml`), the student answers the paper's inference prompt
(the instruction plus the problem, through the chat template) with n samples per problem (3 in
the paper, T=0.6, top-p 0.9); predictions are stored per benchmark in the authors' file format
(`answer` plus a list of sampled `output`s), resumable problem by problem, then graded with
math-verify in worker processes with a hard per-item timeout. Metrics: Pass@1 (mean over samples,
and the first-sample variant), Pass@n, the paper's Avg over benchmarks; results as Markdown and
CSV in the Table 1 layout.

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

from palign.artifacts import file_digests, fingerprint, open_stage_store, read_json, stage_folder, write_json_atomic, write_jsonl_atomic, write_text_atomic
from palign.evaluation.benchmarks import load_benchmark
from palign.evaluation.predictions import PAPER_BENCHMARKS, grade_prediction_file, results_table
from palign.grading import GradingPool
from palign.llm.chat import instruction_prompt
from palign.llm.generation import SamplingConfig
from palign.llm.openai_backend import ChatBackend, LocalChatBackend, complete_missing

log = logging.getLogger(__name__)

# Stored predictions and grades depend on this code as well as on the settings: bump CODE_VERSION
# when a change here changes what is stored, so caches written by older code are never reused
# (tests/test_stage_versions.py notices a change to the logic that did not bump it).
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
    identity = {"model": dict(model_identity), "sampling": {k: v for k, v in vars(sampling_cfg).items() if k != "batch_size"},
                "prompts": {"instruction": prompts["instruction"], "separator": prompts["question_separator"]},
                "code_version": CODE_VERSION}
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
                        problem = by_id[problem_id]
                        store.add({
                            "id": problem.id, "problem": problem.problem, "answer": problem.answer,
                            "output": [g.text for g in generations],
                            "tokens": [g.num_tokens for g in generations],
                            "finished": [g.finished for g in generations],
                        })

                items = [(p.id, instruction_prompt(prompts, p.problem)) for p in problems]
                complete_missing(backend, items, store.__contains__, sampling_cfg, save, chunk_size=chunk_size,
                                 progress=f"eval {name}")
                # the store may hold problems from an earlier, larger limit: grade this run's only
                ordered = [store.get(p.id) for p in problems]
            current = folder / f"{name}.current.jsonl"
            write_jsonl_atomic(current, ordered)
            rows, summary = grade_prediction_file(current, pool)
            for row, prediction in zip(rows, ordered):
                row["output"] = prediction["output"]
                row["tokens"] = prediction["tokens"]
            summary["max_new_tokens"] = sampling_cfg.max_new_tokens
            summary["truncated_rate"] = 100.0 * sum(not f for p in ordered for f in p["finished"]) / sum(len(p["finished"]) for p in ordered)
            graded = folder / f"{name}.graded.jsonl"
            write_jsonl_atomic(graded, rows)
            current.unlink()
            results[name] = BenchmarkResult(name, summary, path, graded, rows)
            log.info("%s: %s", name, {k: round(v, 2) if isinstance(v, float) else v for k, v in summary.items()})
    return results


def average(results: Mapping[str, BenchmarkResult], key: str) -> float:
    values = [r.summary[key] for r in results.values() if key in r.summary]
    return sum(values) / len(values) if values else float("nan")


def results_folder(results: Mapping[str, BenchmarkResult], benchmarks: Mapping[str, Mapping[str, Any]], k: int) -> Path:
    """The folder of one evaluation setting, beside its predictions (see the module docstring)."""
    if not results:
        raise ValueError("no benchmark results to write; configure at least one of evaluation.benchmarks")
    predictions = {r.predictions.parent for r in results.values()}
    if len(predictions) != 1:
        raise ValueError(f"benchmark results from several prediction folders {sorted(map(str, predictions))}; write each evaluation's own")
    key = fingerprint({"benchmarks": {name: dict(benchmarks[name]) for name in results}, "pass_k": k}, length=8)
    return predictions.pop() / f"{'+'.join(results)}-pass{k}-{key}"


def write_results(
    results: Mapping[str, BenchmarkResult],
    student: str,
    method: str,
    run_dir: str | os.PathLike,
    k: int,
    benchmarks: Mapping[str, Mapping[str, Any]],
) -> tuple[str, Path]:
    """Table 1 layout as Markdown and CSV for one (student, method) row, plus metrics.json, in the
    evaluation setting's own folder and, as the latest, in `run_dir`. Returns (markdown, folder).

    benchmarks: the benchmark configs as evaluated (with their limits and held-out ids).
    """
    folder = results_folder(results, benchmarks, k)
    markdown, csv_text = results_table({(student, method): {n: r.summary for n, r in results.items()}}, k=k,
                                       benchmarks=[n for n in PAPER_BENCHMARKS if n in results]
                                       + [n for n in results if n not in PAPER_BENCHMARKS])
    metrics = {n: r.summary for n, r in results.items()}
    predictions = read_json(folder.parent / "settings.json")
    write_json_atomic(folder / "evaluation.json", {"predictions": predictions, "benchmarks": {n: dict(benchmarks[n]) for n in results},
                                                   "pass_k": k, "student": student, "method": method})
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
    backend: str,
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
    vllm: Mapping[str, Any],
    tracker,
    ray: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Stage 4 from the `evaluation` config node (palign/schema.py: Evaluation): the trained student
    in `trained` (or `model_path`, or else the base model) on every configured benchmark; results
    written beside the predictions and in `run_dir`, logged to the run's tracker. Returns the run
    summary's `eval` entry, or None when no benchmark is configured.

    training_ids: the run's training problem ids, read only if a benchmark holds them out.
    ray: the `ray:` block (palign/schema.py: Ray), read when `backend` is ray.
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
    from palign.llm.vllm_backend import resolve_backend

    backend = resolve_backend(backend, "evaluation.backend")
    engine = None
    if backend == "vllm":
        from palign.llm.vllm_backend import vllm_backend

        engine = vllm_backend(spec, cache_dir, vllm, weights=model_path)
    tokenizer = load_tokenizer(spec, cache_dir)
    if backend == "ray":
        from palign.llm.ray_backend import ray_backend

        engine = ray_backend(spec, cache_dir, ray, vllm, tokenizer, weights=model_path, stage="evaluation")
    results = evaluate(
        partial(load_inference_model, spec, cache_dir, path=model_path), {"base": spec.identity(), "weights": model_path and file_digests(model_path)},
        tokenizer, chosen, sampling, prompts, Path(run_dir) / "eval",
        chat_template_kwargs=spec.chat_template_kwargs, grading_workers=grading["workers"],
        grading_timeout_s=grading["timeout_s"], chunk_size=chunk_size, backend=engine,
    )
    # each evaluation setting keeps its own results beside its predictions; the run folder has the latest
    markdown, folder = write_results(results, spec.name, method, run_dir, pass_k, chosen)
    summaries = {name: r.summary for name, r in results.items()}
    averages = {"avg_pass@1": average(results, "pass@1"), f"avg_pass@{pass_k}": average(results, f"pass@{pass_k}")}
    flat = {f"eval/{name}/{key}": v for name, summary in summaries.items() for key, v in summary.items()}
    flat.update({f"eval/{key}": v for key, v in averages.items()})
    tracker.log_summary(flat)
    tracker.log_metrics(flat)
    for name, result in results.items():
        tracker.log_table(
            f"eval/{name}/predictions", ["problem", "sample", "extracted", "correct", "output"],
            [[row["id"], s, row["extracted"][s], row["correct"][s], row["output"][s][-1000:]]
             for row in result.rows for s in range(len(row["correct"]))],
        )
    return {"benchmarks": summaries, **averages, "model": model_path or "base", "table": markdown, "results": str(folder)}
