"""GPU acceptance: palign's three GPU checks in one command, summarised in one table.

1. pipeline   `python run.py experiment=gpu_acceptance trainer=gpu`: every stage of the P-ALIGN
              baseline (truncate -> align -> train -> eval) with a tiny random Llama built on the
              spot, its tokenizer from --tokenizer, teacher traces and a benchmark from JSONL files
              written here (`write_acceptance_data`), metrics to CSV;
2. training   experiments/gpu/check_training.py: the paper's LoRA step at the Qwen2.5-7B shape on
              32k-token examples (gradient checkpointing, Liger's fused cross-entropy): peak memory,
              tokens/s, MFU, and the merged export reloading;
3. inference  experiments/gpu/check_inference.py: the one-pass judge on a 30k-token trace against
              one forward pass (its floor), and generated tokens/s at batch 1 and batched.

Each step runs in its own process (its GPU memory is freed before the next) under what is left of
--deadline-s, so the table is printed even when a step hangs. A step passes when its process exits
0 and its report shows it ran where it should (on CUDA, unless --shrink) and did what it claims; the
exit status is 1 when any step failed. Everything is written under --out: the table
(acceptance.md), every step's report (acceptance.json) and log (<step>.log), the pipeline's run.

    bash experiments/gpu/acceptance.sh               # on the GPU machine (installs the bundle's wheels first)
    python experiments/gpu/acceptance.py --shrink --tokenizer DIR   # anywhere: every step tiny, on the CPU

--shrink runs the same three steps on the CPU at toy sizes (the checks' own --shrink, trainer=cpu):
what tests/integration/test_gpu_checks.py runs, so a GPU session's minutes start on a script known to work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STEPS = ("pipeline", "training", "inference")
# each step's own cap in seconds at full size (estimates for one H100, with room to spare); a step gets
# the smaller of its cap and what is left of the deadline. --shrink multiplies them by SHRUNK_CAP_FACTOR.
STEP_CAPS = {"pipeline": 180, "training": 300, "inference": 240}
SHRUNK_CAP_FACTOR = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="a folder with SmolLM2's tokenizer files (the bundle's tokenizer/, or a converted SmolLM2)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "acceptance", help="where everything is written")
    parser.add_argument("--shrink", action="store_true", help="every step tiny, on the CPU (what the tests run)")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="wall-clock budget of all steps together, default 540 (2400 with --shrink, for a loaded CPU); "
        "a step still running then is stopped and fails",
    )
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    args = parser.parse_args(argv)
    if args.deadline_s is None:
        args.deadline_s = 2400.0 if args.shrink else 540.0
    return args


# -- the pipeline's data ------------------------------------------------------------------------
def _sum_problem(n: int) -> tuple[str, str, str]:
    """'the sum of 1..n', worked one addition per sentence (one unit each for the truncation search)."""
    steps, total = [], 1
    for k in range(2, n + 1):
        steps.append(f"Adding {k} to {total} gives {total + k}.")
        total += k
    trace = (
        f"We add the whole numbers from 1 to {n} one at a time, starting from 1. "
        + " ".join(steps)
        + f" As a check, the formula n(n+1)/2 gives {n} times {n + 1} over 2, which is {n * (n + 1) // 2}."
        + f" So the sum is \\boxed{{{total}}}."
    )
    return f"What is the sum of the whole numbers from 1 to {n}?", str(total), trace


def _product_problem(n: int) -> tuple[str, str, str]:
    """'n!', worked one multiplication per sentence."""
    steps, total = [], 1
    for k in range(2, n + 1):
        steps.append(f"Multiplying {total} by {k} gives {total * k}.")
        total *= k
    trace = (
        f"The factorial {n}! is the product of the whole numbers from 1 to {n}; we multiply them in order. "
        + " ".join(steps)
        + f" So {n}! is \\boxed{{{total}}}."
    )
    return f"What is the value of {n}! (the factorial of {n})?", str(total), trace


def write_acceptance_data(folder: Path, teacher_problems: int = 12, benchmark_problems: int = 4) -> dict[str, Path]:
    """Teacher traces (`teacher.jsonl`: id, question, answer, long_cot) and a disjoint benchmark
    (`benchmark.jsonl`: id, problem, answer) of worked arithmetic, correct by construction: the
    pipeline needs no data package, no Hub and nothing beside the repository."""
    folder.mkdir(parents=True, exist_ok=True)
    problems = [_sum_problem, _product_problem]
    teacher, benchmark = [], []
    for i in range(teacher_problems):
        question, answer, trace = problems[i % 2](5 + i)
        teacher.append({"id": f"teacher-{i}", "question": question, "answer": answer, "long_cot": trace})
    for i in range(benchmark_problems):
        question, answer, _ = problems[i % 2](5 + teacher_problems + i)
        benchmark.append({"id": f"benchmark-{i}", "problem": question, "answer": answer})
    paths = {"teacher": folder / "teacher.jsonl", "benchmark": folder / "benchmark.jsonl"}
    for name, rows in (("teacher", teacher), ("benchmark", benchmark)):
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


# -- the steps ----------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    report: Path | None = None  # the JSON the step writes (the pipeline's is found after it ran)


@dataclass
class Outcome:
    name: str
    passed: bool
    seconds: float
    figures: str
    problems: list[str]
    report: dict | None


def pipeline_step(args, out: Path) -> Step:
    data = write_acceptance_data(out / "data")
    runs = out / "pipeline"
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "~local",
        "experiment=gpu_acceptance",
        f"trainer={'cpu' if args.shrink else 'gpu'}",
        f"student.tokenizer_from.pretrained={args.tokenizer.resolve()}",
        f"teacher.source.path={data['teacher'].resolve()}",
        f"evaluation.benchmarks.acceptance.local_path={data['benchmark'].resolve()}",
    ]
    env = {"PALIGN_OUTPUTS": str(runs), "PALIGN_CACHE": str(runs / "cache"), "WANDB_MODE": "disabled"}
    return Step("pipeline", command, env)


def training_step(args, out: Path) -> Step:
    report = out / "training.json"
    command = [sys.executable, "-m", "experiments.gpu.check_training", "--out", str(report)]
    # Liger by name on the GPU: a missing or broken kernel fails the step instead of falling back
    command += ["--shrink", "--steps", "2"] if args.shrink else ["--loss-kernel", "liger"]
    return Step("training", command, report=report)


def inference_step(args, out: Path) -> Step:
    report = out / "inference.json"
    command = [
        sys.executable,
        "-m",
        "experiments.gpu.check_inference",
        "--tokenizer",
        str(args.tokenizer.resolve()),
        "--out",
        str(report),
    ]
    if args.shrink:
        command.append("--shrink")
    return Step("inference", command, report=report)


def run_step(step: Step, out: Path, timeout: float) -> tuple[int | None, float, Path]:
    """Run the step's command, its output to <out>/<name>.log; None as the exit code when it timed out."""
    log_path = out / f"{step.name}.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **step.env,
    }
    print(f"[acceptance] {step.name}: {' '.join(step.command)}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and what it started (grading workers, dataloaders)
            proc.wait()
            code = None
    return code, time.perf_counter() - started, log_path


# -- judging each step's report ------------------------------------------------------------------
def judge_pipeline(report: dict, shrink: bool) -> tuple[list[str], str]:
    problems = []
    train, trunc, align = report.get("train", {}), report.get("truncation", {}), report.get("alignment", {})
    evaluation = report.get("eval") or {}
    placement = report.get("inference_placement", {})
    want = "cpu" if shrink else "cuda"
    if not train.get("complete") or not train.get("global_step"):
        problems.append("training did not complete an optimizer step")
    if not trunc.get("examples"):
        problems.append("no trace was truncated")
    if not align.get("examples"):
        problems.append("no prefix was continued")
    if not evaluation.get("benchmarks", {}).get("acceptance"):
        problems.append("no evaluation result for the acceptance benchmark")
    for stage, where in placement.items():
        if not where["device"].startswith(want):
            problems.append(f"{stage} ran on {where['device']}, not {want}")
    curve = train.get("loss_curve") or []
    bench = evaluation.get("benchmarks", {}).get("acceptance", {})
    figures = [
        f"{trunc.get('examples', 0)} traces truncated "
        f"(mean prefix ratio {trunc.get('prefix_ratio_mean', float('nan')):.2f}, "
        f"{trunc.get('judge_calls_per_example', float('nan')):.1f} judge calls each)",
        f"{align.get('examples', 0)} continuations",
        f"{train.get('global_step', 0)} optimizer steps on {report.get('data', {}).get('train/examples', 0)} examples"
        + (f", loss {curve[0]:.2f} -> {curve[-1]:.2f}" if curve else ""),
        f"eval pass@1 {bench.get('pass@1', float('nan')):.1f} over {bench.get('num_problems', 0)} problems "
        f"x {bench.get('num_samples', 0)} samples",
        "inference on " + ", ".join(sorted({f"{w['device']} {w['dtype']}" for w in placement.values()})),
    ]
    return problems, "; ".join(figures)


def judge_training(report: dict, shrink: bool) -> tuple[list[str], str]:
    problems = []
    if not shrink and report.get("device") == "cpu":
        problems.append("ran on the CPU")
    if not shrink and report.get("loss_kernel") != "liger":
        problems.append(f"loss kernel {report.get('loss_kernel')}, not liger")
    if report.get("export_reloads") is not True:
        problems.append("the merged LoRA export did not reload")
    if not report.get("steps"):
        problems.append("no optimizer step")
    mfu = report.get("mfu")
    peak = report.get("peak_memory_gib")
    figures = [
        f"{report.get('shape')} shape, {report.get('tokens_per_example')} tokens/example, "
        f"{report.get('loss_kernel')} loss",
        f"peak {peak:.1f} GiB" if peak is not None else "peak n/a (CPU)",
        f"{report.get('tokens_per_s', 0):,.0f} tokens/s",
        f"MFU {100 * mfu:.1f}%" if mfu is not None else f"{report.get('model_tflops_per_s', 0):.3f} model TFLOP/s",
        "export reloads" if report.get("export_reloads") else "export FAILED",
    ]
    return problems, ", ".join(figures)


def judge_inference(report: dict, shrink: bool) -> tuple[list[str], str]:
    problems = []
    if not shrink and report.get("device") == "cpu":
        problems.append("ran on the CPU")
    if not report.get("prefixes_scored"):
        problems.append("the judge scored no prefix")
    batched = next(
        (k for k in report if k.startswith("generated_tokens_per_s_batch") and not k.endswith("batch1")), None
    )
    peak = report.get("judge_peak_gib")
    figures = [
        f"{report.get('trace_tokens')}-token trace, {report.get('prefixes_scored')} prefixes: one-pass judge "
        f"{report.get('one_pass_judge_s', 0):.2f} s = {report.get('judge_over_floor', 0):.2f}x one forward"
        + (f", peak {peak:.1f} GiB" if peak is not None else ""),
        f"generation {report.get('generated_tokens_per_s_batch1', 0):.1f} tokens/s at batch 1"
        + (
            f", {report[batched]:.1f} at batch {batched.removeprefix('generated_tokens_per_s_batch')}"
            if batched
            else ""
        ),
    ]
    return problems, "; ".join(figures)


JUDGES = {"pipeline": judge_pipeline, "training": judge_training, "inference": judge_inference}


def pipeline_summary(out: Path) -> Path | None:
    found = sorted((out / "pipeline" / "runs").glob("*/summary.json"))
    return found[0] if len(found) == 1 else None


def log_tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def table(outcomes: list[Outcome], header: str) -> str:
    rows = [header, "", "| step | result | wall s | figures |", "|---|---|---:|---|"]
    for o in outcomes:
        result = "pass" if o.passed else "FAIL: " + "; ".join(o.problems)
        rows.append(f"| {o.name} | {result} | {o.seconds:.1f} | {o.figures} |")
    failed = [o.name for o in outcomes if not o.passed]
    rows += [
        "",
        f"acceptance: {len(outcomes) - len(failed)} of {len(outcomes)} steps passed"
        + (f" (failed: {', '.join(failed)})" if failed else ""),
    ]
    return "\n".join(rows)


def environment_line(shrink: bool) -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    packages = (
        "torch",
        "transformers",
        "pytorch-lightning",
        "peft",
        "huggingface-hub",
        "datasets",
        "pyarrow",
        "fsspec",
        "hydra-core",
        "math-verify",
        "liger-kernel",
        "triton",
    )
    return (
        f"palign GPU acceptance ({'shrunk, on the CPU' if shrink else 'full size'}); python {sys.version.split()[0]}; "
        + ", ".join(f"{p} {v(p)}" for p in packages)
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    if not (args.tokenizer / "tokenizer_config.json").exists():
        print(
            f"no tokenizer at {args.tokenizer} (tokenizer_config.json missing): run experiments/gpu/fetch_wheels.sh "
            "on a machine with the project's venv to write the bundle, or pass --tokenizer DIR",
            file=sys.stderr,
        )
        return 2
    if not args.shrink:
        import torch

        if not torch.cuda.is_available():
            print(
                "no CUDA device: the full-size checks need a GPU; use --shrink to run them tiny on the CPU",
                file=sys.stderr,
            )
            return 2
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "pipeline", ignore_errors=True)  # a fresh run: a rerun would only skip finished stages
    for stale in [out / f"{name}.json" for name in STEPS] + [out / "acceptance.json", out / "acceptance.md"]:
        stale.unlink(missing_ok=True)
    header = environment_line(args.shrink)
    print(f"[acceptance] {header}", flush=True)

    builders = {"pipeline": pipeline_step, "training": training_step, "inference": inference_step}
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    for name in args.steps:
        step = builders[name](args, out)
        left = args.deadline_s - (time.perf_counter() - started)
        timeout = min(STEP_CAPS[name] * (SHRUNK_CAP_FACTOR if args.shrink else 1), left)
        if timeout < 5:
            outcomes.append(
                Outcome(name, False, 0.0, "", [f"not run: the {args.deadline_s:.0f} s deadline was spent"], None)
            )
            continue
        code, seconds, log_path = run_step(step, out, timeout)
        report_path = pipeline_summary(out) if name == "pipeline" else step.report
        problems, figures, report = [], "", None
        if code is None:
            problems.append(f"stopped after {timeout:.0f} s")
        elif code != 0:
            problems.append(f"exit code {code}")
        try:
            report = json.loads(report_path.read_text()) if report_path and report_path.exists() else None
            if report is not None:
                found, figures = JUDGES[name](report, args.shrink)
                problems += found
            elif code == 0:
                problems.append("wrote no report")
        except (
            ValueError,
            KeyError,
            TypeError,
        ) as err:  # a half-written or unexpected report is a failure, not a crash
            problems.append(f"its report {report_path} could not be read ({type(err).__name__}: {err})")
        if problems:
            print(
                f"[acceptance] {name} failed ({'; '.join(problems)}); the end of {log_path}:\n{log_tail(log_path)}",
                flush=True,
            )
        outcomes.append(Outcome(name, not problems, seconds, figures, problems, report))
        print(f"[acceptance] {name}: {'pass' if not problems else 'FAIL'} in {seconds:.1f} s", flush=True)

    text = table(outcomes, header)
    (out / "acceptance.md").write_text(text + "\n")
    (out / "acceptance.json").write_text(
        json.dumps(
            {
                "header": header,
                "shrink": args.shrink,
                "wall_s": time.perf_counter() - started,
                "steps": {
                    o.name: {
                        "passed": o.passed,
                        "seconds": o.seconds,
                        "problems": o.problems,
                        "figures": o.figures,
                        "report": o.report,
                    }
                    for o in outcomes
                },
            },
            indent=2,
        )
    )
    print("\n" + text, flush=True)
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
