"""Benchmark of stage 1 (adaptive prefix truncation, PAPER.md §2.1) on the real SmolLM2-135M judge.

Runs on the shortest Sky-T1 AMC23 long-CoT traces (the `jsonl` teacher's fields and marker
stripping, `conf/teacher/jsonl.yaml`), with the paper's judge prompt (`conf/judge_prompt/paper.yaml`),
and measures in one process, on the same traces:

  (a) the authors' loop: one example and one prefix at a time (batch 1), `generate` mode (greedy,
      up to --max-new-tokens), binary search, without the authors' `time.sleep(0.5)`;
  (b) batched binary search in `logits` mode: all examples advance together (`run_searches`);
  (c) exhaustive search in `logits` mode: every prefix judged, batched;
  (d) the floor: one forward pass per trace over the judge prompt holding the whole trace.

It prints wall and CPU seconds, examples/s, judge calls per example, the prompt tokens fed to the
model (real tokens, padding excluded) and, for (a), the generated tokens, the speed-up against the
baseline ((a), or (b) with --skip-generate), the load average, and this process's peak RSS (a
running maximum, so a row shows the peak up to the end of that measurement). Then, per trace, the
prefix length each search chose, and how often `logits` and `generate` verdicts agree on the same
(trace, k): on the probes both (a) and (b) judged, and on every probe of (a) against the
exhaustive scores of (c) under both threshold rules.

Run from the repository root:  python -m experiments.bench.truncation [--traces 2] [--skip-generate]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from palign.config import CONFIG_DIR, PROJECT_ROOT
from palign.llm.models import ModelSpec, load_model, load_tokenizer
from palign.truncation.judge import JudgePrompt, SufficiencyJudge, ThresholdRule
from palign.truncation.search import SearchResult, create_search, run_searches
from palign.truncation.units import GRANULARITIES, Segmentation, segment

TEACHER_FILE = PROJECT_ROOT.parent / "shared" / "data" / "teacher" / "skyt1_14b_amc23_longcot.jsonl"
DEFAULT_CACHE = os.environ.get("PALIGN_CACHE", str(PROJECT_ROOT / "outputs" / "cache"))
# The judge defaults (batch size, max_new_tokens, threshold rules) live in these configs only.
JUDGE_DEFAULTS = OmegaConf.load(CONFIG_DIR / "judge" / "self.yaml")
CALIBRATED_THRESHOLD = OmegaConf.load(CONFIG_DIR / "judge" / "self_calibrated.yaml").threshold


@dataclass
class Example:
    id: str
    question: str
    units: Segmentation

    def pair(self, k: int) -> tuple[str, str]:
        return self.question, self.units.prefix(k)


@dataclass
class Measurement:
    label: str
    wall_s: float
    cpu_s: float
    examples: int
    judge_calls: int
    prompt_tokens: int
    new_tokens: int | None
    load_1m: float
    peak_rss_mib: float


def peak_rss_mib() -> float:
    """Peak RSS of this process so far in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_examples(path: str, count: int, granularity: str, tokenizer) -> list[Example]:
    """The `count` shortest traces of `path`, read the way the `jsonl` teacher config reads them."""
    source = OmegaConf.load(CONFIG_DIR / "teacher" / "jsonl.yaml").source
    source.path = path
    records = sorted(instantiate(source).load().records, key=lambda r: len(r.long_cot))
    options = {"tokenizer": tokenizer} if granularity == "token_chunk" else {}
    examples = []
    for record in records:
        units = segment(record.long_cot, granularity, **options)
        if units.m:
            examples.append(Example(record.id, record.question, units))
        if len(examples) == count:
            break
    return examples


def measure(label: str, judge: SufficiencyJudge, examples: Sequence[Example], work: Callable[[], object]):
    """Run `work` once, timing it; returns (measurement without token counts, what `work` returned)."""
    calls_before = judge.calls
    wall, cpu = time.perf_counter(), time.process_time()
    output = work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    measurement = Measurement(
        label=label,
        wall_s=wall,
        cpu_s=cpu,
        examples=len(examples),
        judge_calls=judge.calls - calls_before,
        prompt_tokens=0,
        new_tokens=None,
        load_1m=os.getloadavg()[0],
        peak_rss_mib=peak_rss_mib(),
    )
    print(f"  {label}: {wall:.1f} s", file=sys.stderr, flush=True)
    return measurement, output


def authors_loop(judge: SufficiencyJudge, examples: Sequence[Example]) -> list[SearchResult]:
    """The authors' loop (PAPER.md §2.1 item 3): each example in turn, one probe per judge call."""
    results = []
    for example in examples:
        state = create_search("binary", example.units.m)
        while not state.done:
            (k,) = state.pending()
            (verdict,) = judge.judge([example.pair(k)])
            state.observe(k, verdict.sufficient, verdict.score, verdict.reply)
        results.append(state.result())
    return results


def thresholds_for(judge: SufficiencyJudge, examples: Sequence[Example], rule: ThresholdRule) -> list[float]:
    """Per-example score thresholds; `relative_to_full` costs one full-trace forward per example."""
    if rule.kind == "absolute":
        return [rule.value] * len(examples)
    full = judge.score([example.pair(example.units.m) for example in examples])
    return [score - rule.value for score in full]


def batched_search(
    judge: SufficiencyJudge, examples: Sequence[Example], strategy: str, rule: ThresholdRule
) -> list[SearchResult]:
    """Stage 1 as `PrefixTruncation` runs it: every example advances together, `logits` mode."""
    thresholds = thresholds_for(judge, examples, rule)
    states = [create_search(strategy, example.units.m) for example in examples]

    def judge_batch(requests):
        pairs = [examples[index].pair(k) for index, k in requests]
        return judge.judge(pairs, [thresholds[index] for index, _ in requests])

    return run_searches(states, judge_batch, judge.batch_size)


def probe_tokens(judge: SufficiencyJudge, examples: Sequence[Example], results: Sequence[SearchResult]) -> int:
    """Prompt tokens of every probe (`judge.encode` adds the verdicts' shared prefix, e.g. `[`)."""
    extra = 0 if judge.mode == "logits" else -len(judge.verdict_prefix)
    return sum(
        len(judge.encode(*example.pair(probe.k))) + extra
        for example, result in zip(examples, results)
        for probe in result.probes
    )


def agreement(pairs: Sequence[tuple[bool, bool]]) -> str:
    """'agree/total (pct); confusion' for (generate verdict, logits verdict) pairs."""
    if not pairs:
        return "no shared probes"
    agree = sum(g == lg for g, lg in pairs)
    cells = {
        "gen E & log E": sum(g and lg for g, lg in pairs),
        "gen N & log N": sum(not g and not lg for g, lg in pairs),
        "gen E & log N": sum(g and not lg for g, lg in pairs),
        "gen N & log E": sum(not g and lg for g, lg in pairs),
    }
    confusion = ", ".join(f"{name} {count}" for name, count in cells.items())
    return f"{agree}/{len(pairs)} ({100 * agree / len(pairs):.0f}%); {confusion}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=str(TEACHER_FILE), help="Sky-T1-style JSONL of teacher traces")
    parser.add_argument("--traces", type=int, default=2, help="number of traces, shortest first")
    parser.add_argument("--granularity", default="paper_sentence", choices=sorted(GRANULARITIES))
    parser.add_argument("--max-new-tokens", type=int, default=JUDGE_DEFAULTS.max_new_tokens,
                        help="generate-mode reply budget for (a)")
    parser.add_argument("--batch-size", type=int, default=JUDGE_DEFAULTS.batch_size,
                        help="logits-mode judge batch size for (b) and (c)")
    parser.add_argument("--threshold-kind", default=JUDGE_DEFAULTS.threshold.kind,
                        choices=("absolute", "relative_to_full"), help="logits-mode verdict rule of (b), (c)")
    parser.add_argument("--threshold-value", type=float, default=JUDGE_DEFAULTS.threshold.value)
    parser.add_argument("--skip-generate", action="store_true", help="skip (a), the slow generate-mode loop")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the converted judge model is cached")
    args = parser.parse_args()
    if not os.path.exists(args.path):
        sys.exit(f"{args.path}: teacher traces not found (needs ../shared/data next to the repo, or --path)")
    rule = ThresholdRule.from_config({"kind": args.threshold_kind, "value": args.threshold_value})

    start = time.perf_counter()
    spec = ModelSpec.from_config(OmegaConf.load(CONFIG_DIR / "student" / "smollm2_135m.yaml"))
    model, tokenizer = load_model(spec, args.cache_dir), load_tokenizer(spec, args.cache_dir)
    prompt = JudgePrompt.from_config(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "judge_prompt" / "paper.yaml")))
    load_s = time.perf_counter() - start
    examples = load_examples(args.path, args.traces, args.granularity, tokenizer)

    def make_judge(mode: str, batch_size: int, max_new_tokens: int = args.max_new_tokens) -> SufficiencyJudge:
        return SufficiencyJudge(model, tokenizer, prompt, mode=mode, chat_template_kwargs=spec.chat_template_kwargs,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)

    generate_judge = make_judge("generate", batch_size=1)
    logits_judge = make_judge("logits", batch_size=args.batch_size)
    full_tokens = [len(logits_judge.encode(*example.pair(example.units.m))) for example in examples]
    print(f"{len(examples)} traces from {args.path}: ids {[e.id for e in examples]}, "
          f"m = {[e.units.m for e in examples]} {args.granularity} units, "
          f"full-trace judge prompts {full_tokens} tokens")
    print(f"judge {spec.name} ({spec.dtype}), loaded in {load_s:.1f} s; torch threads {torch.get_num_threads()}; "
          f"logits rule {rule.kind} {rule.value:g}; load average at start {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs")

    # Warm up both code paths so no measurement pays for first-call allocation.
    logits_judge.score([examples[0].pair(1)])
    make_judge("generate", batch_size=1, max_new_tokens=2).generate_replies([examples[0].pair(1)])

    measurements: list[Measurement] = []
    generated: list[SearchResult] | None = None
    if not args.skip_generate:
        row, generated = measure("(a) authors: binary, generate, batch 1", generate_judge, examples,
                                 lambda: authors_loop(generate_judge, examples))
        row.prompt_tokens = probe_tokens(generate_judge, examples, generated)
        row.new_tokens = sum(len(tokenizer(p.reply or "", add_special_tokens=False)["input_ids"])
                             for result in generated for p in result.probes)
        measurements.append(row)

    full_cost = sum(full_tokens) if rule.kind == "relative_to_full" else 0
    row, binary = measure(f"(b) binary, logits, batch {args.batch_size}", logits_judge, examples,
                          lambda: batched_search(logits_judge, examples, "binary", rule))
    row.prompt_tokens = probe_tokens(logits_judge, examples, binary) + full_cost
    measurements.append(row)

    row, exhaustive = measure(f"(c) exhaustive, logits, batch {args.batch_size}", logits_judge, examples,
                              lambda: batched_search(logits_judge, examples, "exhaustive", rule))
    row.prompt_tokens = probe_tokens(logits_judge, examples, exhaustive) + full_cost
    measurements.append(row)

    row, full_scores = measure("(d) floor: full trace, 1 forward", logits_judge, examples,
                               lambda: [logits_judge.score([example.pair(example.units.m)])[0] for example in examples])
    row.prompt_tokens = sum(full_tokens)
    measurements.append(row)

    baseline = measurements[0]
    print(f"\n| measurement | wall s | CPU s | examples/s | judge calls/example | prompt tokens | new tokens "
          f"| x {baseline.label[:3]} | load 1m | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in measurements:
        rate = m.examples / m.wall_s
        print(f"| {m.label} | {m.wall_s:.2f} | {m.cpu_s:.2f} | {rate:.3f} | {m.judge_calls / m.examples:.1f} "
              f"| {m.prompt_tokens} | {'~' + str(m.new_tokens) if m.new_tokens is not None else '-'} "
              f"| {rate / (baseline.examples / baseline.wall_s):.1f} | {m.load_1m:.2f} | {m.peak_rss_mib:.0f} |")

    print("\n| trace | m | full score | k (a) generate | k (b) logits | k (c) exhaustive | monotone (c) "
          "| probes (a) | probes (b) |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|")

    def probes(result: SearchResult | None) -> str:
        if result is None:
            return "-"
        return " ".join(f"{p.k}{'E' if p.sufficient else 'N'}" for p in result.probes)

    for i, example in enumerate(examples):
        k_a = "-" if generated is None else f"{generated[i].chosen_k}{' (fallback)' if generated[i].fallback else ''}"
        k_b = f"{binary[i].chosen_k}{' (fallback)' if binary[i].fallback else ''}"
        print(f"| {example.id} | {example.units.m} | {full_scores[i]:.2f} | {k_a} | {k_b} | {exhaustive[i].chosen_k} "
              f"| {exhaustive[i].monotone} | {probes(generated[i] if generated else None)} | {probes(binary[i])} |")

    if generated is None:
        return
    generate_verdicts = {(i, p.k): p.sufficient for i, r in enumerate(generated) for p in r.probes}
    binary_verdicts = {(i, p.k): p.sufficient for i, r in enumerate(binary) for p in r.probes}
    scores = {(i, p.k): p.score for i, r in enumerate(exhaustive) for p in r.probes}
    shared = sorted(generate_verdicts.keys() & binary_verdicts.keys())
    print("\nverdict agreement, generate (a) vs logits:")
    print(f"- probes judged by both (a) and (b), rule {rule.kind} {rule.value:g}: "
          + agreement([(generate_verdicts[key], binary_verdicts[key]) for key in shared]))
    calibrated = ThresholdRule.from_config(OmegaConf.to_container(CALIBRATED_THRESHOLD))
    for label, threshold in (
        (f"absolute {JUDGE_DEFAULTS.threshold.value:g}", lambda i: JUDGE_DEFAULTS.threshold.value),
        (f"relative_to_full {calibrated.value:g}", lambda i: full_scores[i] - calibrated.value),
    ):
        pairs = [(verdict, scores[i, k] >= threshold(i)) for (i, k), verdict in sorted(generate_verdicts.items())]
        print(f"- every (a) probe vs the exhaustive scores of (c), rule {label}: {agreement(pairs)}")
    replies = [p.reply or "" for r in generated for p in r.probes]
    distinct = sorted(set(replies), key=replies.index)
    print(f"- (a) replies: {sum(generate_judge.prompt.is_sufficient_reply(r) for r in replies)}/{len(replies)} "
          f"parsed ENOUGH, {len(distinct)} distinct; first ones: "
          + " | ".join(repr(r[:80]) for r in distinct[:3]))


if __name__ == "__main__":
    main()
