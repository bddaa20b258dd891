"""Benchmark of stage 1 (adaptive prefix truncation, PAPER.md §2.1) on the real SmolLM2-135M judge.

Runs on the shortest Sky-T1 AMC23 long-CoT traces (the `jsonl` teacher's fields and marker
stripping, `conf/teacher/jsonl.yaml`), with the paper's judge prompt (`conf/truncation/judge_prompt/paper.yaml`),
and measures in one process, on the same traces:

  (a) the authors' loop: one example and one prefix at a time (batch 1), `generate` mode (greedy,
      up to --max-new-tokens), binary search, without the authors' `time.sleep(0.5)`;
  (b) `PrefixTruncation`, binary search, `logits` mode, `batched` engine (each probe its own
      sequence, --batch-size per forward);
  (c) `PrefixTruncation`, exhaustive search, `one_pass` engine: every prefix judged;
  (e) `PrefixTruncation`, binary search, `one_pass` engine;
  (d) the floor: one forward pass (batch 1) per trace over the judge prompt holding the whole trace,
      tokenized unit by unit as the stage does (`prefix_tokens`); no method can judge the longest
      prefix for less. Only the forward is timed.

Every `PrefixTruncation` row gets a fresh temporary cache folder, so nothing is a cache hit; its
time includes everything the stage does (segmenting, tokenizing, the record store).

It prints per row wall and CPU seconds, examples/s, prefixes scored and judge verdicts consulted per
example, the speed-up against the baseline ((a), or (b) with --skip-generate), the time relative to
the floor, the load average and this process's peak RSS (a running maximum, so a row shows the peak
up to the end of that measurement). Then the issue's goals, where (c)'s time goes beyond the floor,
the largest score difference between the two engines, the prefix length each search chose, and how
often `logits` and `generate` verdicts agree on the same (trace, k).

Run from the repository root:  python -m experiments.bench.truncation [--traces 2] [--skip-generate]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from palign.config import CONFIG_DIR, PROJECT_ROOT
from palign.llm.models import ModelSpec, load_model, load_tokenizer
from palign.schema import JsonlSource, Judge, JudgePrompt, Truncation, defaults
from palign.teachers.records import TeacherRecord
from palign.truncation.judge import SufficiencyJudge, Threshold, is_sufficient_reply
from palign.truncation.prefixes import AdaptivePrefix
from palign.truncation.search import BinaryPrefixSearch, SearchResult
from palign.truncation.stage import PrefixTruncation
from palign.truncation.units import Segmentation, Splitter

TEACHER_FILE = PROJECT_ROOT.parent / "shared" / "data" / "teacher" / "skyt1_14b_amc23_longcot.jsonl"
DEFAULT_CACHE = os.environ.get("PALIGN_CACHE", str(PROJECT_ROOT / "outputs" / "cache"))
# The judge defaults (batch size, max_new_tokens, thresholds) live in these configs only; the default
# threshold is the calibrated one (relative to the full trace), so binary search is not degenerate.
JUDGE_DEFAULTS = defaults(Judge)  # the schema's judge settings (conf/truncation/judge/self.yaml)
CALIBRATED_VALUE = OmegaConf.load(CONFIG_DIR / "truncation" / "judge" / "self_calibrated.yaml").threshold.value
GRANULARITIES = sorted(path.stem for path in (CONFIG_DIR / "truncation" / "granularity").glob("*.yaml"))


def option(group: str, name: str, **options: Any) -> Any:
    """conf/truncation/<group>/<name>.yaml built as the stage builds it, `options` replacing its file's."""
    return instantiate(OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "truncation" / group / f"{name}.yaml"), options))


# The goals.
GOAL_SPEEDUP = 12.0  # (c) examples/s over (a)
GOAL_FLOOR = 1.3  # (c) time over (d)


@dataclass
class Example:
    record: TeacherRecord
    units: Segmentation

    @property
    def id(self) -> str:
        return self.record.id

    def pair(self, k: int) -> tuple[str, str]:
        return self.record.question, self.units.prefix(k)


@dataclass
class Measurement:
    label: str
    wall_s: float
    cpu_s: float
    examples: int
    prefixes_scored: int | None = None
    verdicts: int | None = None
    load_1m: float = 0.0
    peak_rss_mib: float = 0.0


def peak_rss_mib() -> float:
    """Peak RSS of this process so far in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_examples(path: str, count: int, splitter: Splitter, tokenizer) -> list[Example]:
    """The `count` shortest traces of `path` that have units, read the way the `jsonl` teacher does."""
    source = OmegaConf.merge(
        OmegaConf.structured(JsonlSource), OmegaConf.load(CONFIG_DIR / "teacher" / "jsonl.yaml").source
    )
    source.path = path
    records = sorted(instantiate(source).load().records, key=lambda r: len(r.long_cot))
    examples = []
    for record in records:
        units = splitter.split(record.long_cot, tokenizer)
        if units.m:
            examples.append(Example(record, units))
        if len(examples) == count:
            break
    return examples


def timed(label: str, work: Callable[[], Any], examples: int) -> tuple[Measurement, Any]:
    """Run `work` once, timing it; returns (measurement without per-example counts, its output)."""
    wall, cpu = time.perf_counter(), time.process_time()
    output = work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"  {label}: {wall:.1f} s", file=sys.stderr, flush=True)
    return Measurement(label, wall, cpu, examples, load_1m=os.getloadavg()[0], peak_rss_mib=peak_rss_mib()), output


def authors_loop(judge: SufficiencyJudge, examples: Sequence[Example]) -> list[SearchResult]:
    """The authors' loop (PAPER.md §2.1 item 3): each example in turn, one probe per judge call."""
    results = []
    for example in examples:
        state = BinaryPrefixSearch(example.units.m)
        while not state.done:
            (k,) = state.pending()
            (verdict,) = judge.judge([example.pair(k)])
            state.observe(k, verdict.sufficient, verdict.score, verdict.reply)
        results.append(state.result())
    return results


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
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=JUDGE_DEFAULTS["max_new_tokens"],
        help="generate-mode reply budget for (a)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=JUDGE_DEFAULTS["batch_size"],
        help="sequences per forward of the batched engine, (b)",
    )
    parser.add_argument(
        "--threshold-kind",
        default="relative_to_full",
        choices=("absolute", "relative_to_full"),
        help="logits-mode verdict rule of (b), (c), (e) (conf/truncation/judge/threshold/)",
    )
    parser.add_argument("--threshold-value", type=float, default=CALIBRATED_VALUE)
    parser.add_argument("--skip-generate", action="store_true", help="skip (a), the slow generate-mode loop")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the converted judge model is cached")
    args = parser.parse_args()
    if not os.path.exists(args.path):
        sys.exit(f"{args.path}: teacher traces not found (needs ../shared/data next to the repo, or --path)")
    # built here, so a bad threshold fails before the model loads
    threshold: Threshold = option("judge/threshold", args.threshold_kind, value=args.threshold_value)
    splitter: Splitter = option("granularity", args.granularity)

    start = time.perf_counter()
    spec = ModelSpec.from_config(OmegaConf.load(CONFIG_DIR / "student" / "smollm2_135m.yaml"))
    model, tokenizer = load_model(spec, args.cache_dir), load_tokenizer(spec, args.cache_dir)
    prompt = JudgePrompt(
        **OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "truncation" / "judge_prompt" / "paper.yaml"))
    )
    load_s = time.perf_counter() - start
    examples = load_examples(args.path, args.traces, splitter, tokenizer)
    records = [example.record for example in examples]

    def make_judge(
        mode: str,
        engine: str = "one_pass",
        batch_size: int = args.batch_size,
        max_new_tokens: int = args.max_new_tokens,
    ) -> SufficiencyJudge:
        return SufficiencyJudge.hf(
            model,
            tokenizer,
            prompt,
            mode=mode,
            chat_template_kwargs=spec.chat_template_kwargs,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            engine=engine,
        )

    generate_judge = make_judge("generate", batch_size=1)
    batched_judge = make_judge("logits", engine="batched")
    one_pass_judge = make_judge("logits", engine="one_pass")
    floor_judge = make_judge("logits", engine="batched", batch_size=1)

    # The floor's prompts: head + every unit's piece + tail, the tokens the stage's longest prefix has.
    tokenize_s = time.perf_counter()
    full_prompts = []
    for example in examples:
        head, pieces, tail = floor_judge.prefix_tokens(example.record.question, example.units)
        full_prompts.append(head + [t for piece in pieces for t in piece] + tail)
    tokenize_s = time.perf_counter() - tokenize_s
    print(
        f"{len(examples)} traces from {args.path}: ids {[e.id for e in examples]}, "
        f"m = {[e.units.m for e in examples]} {args.granularity} units, "
        f"full-trace judge prompts {[len(p) for p in full_prompts]} tokens"
    )
    print(
        f"judge {spec.name} ({spec.dtype}), loaded in {load_s:.1f} s; torch threads {torch.get_num_threads()}; "
        f"logits rule {args.threshold_kind} {args.threshold_value:g}; load average at start "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )

    # Warm up every code path so no measurement pays for first-call allocation.
    batched_judge.score([examples[0].pair(1)])
    one_pass_judge.prefix_scores([(examples[0].record.question, examples[0].units, [1])])
    make_judge("generate", batch_size=1, max_new_tokens=2).generate_replies([examples[0].pair(1)])

    def stage_row(label: str, search: str, judge: SufficiencyJudge) -> tuple[Measurement, list[dict[str, Any]]]:
        """`PrefixTruncation` as the pipeline builds it, in a fresh cache folder (no cache hits)."""
        node = Judge(
            **{
                **JUDGE_DEFAULTS,
                "model": spec,
                "mode": "logits",
                "threshold": threshold,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
            }
        )
        with tempfile.TemporaryDirectory(prefix="bench-truncation-") as folder:
            stage = PrefixTruncation(
                AdaptivePrefix(),
                splitter,
                folder,
                tokenizer,
                chunk_size=defaults(Truncation)["chunk_size"],
                search=option("search", search),
                judge=node,
                judge_prompt=prompt,
                judge_factory=lambda: judge,
                progress=False,
            )
            row, rows = timed(label, lambda: stage.run(records), len(records))
        if [r["id"] for r in rows] != [e.id for e in examples]:
            raise RuntimeError(f"{label}: the stage returned rows for {[r['id'] for r in rows]}")
        row.prefixes_scored = sum(r["prefixes_scored"] for r in rows)
        row.verdicts = sum(len(r["probes"]) for r in rows)
        return row, rows

    measurements: dict[str, Measurement] = {}
    generated: list[SearchResult] | None = None
    if not args.skip_generate:
        row, generated = timed(
            "(a) authors: binary, generate, batch 1", lambda: authors_loop(generate_judge, examples), len(examples)
        )
        row.prefixes_scored = row.verdicts = sum(len(result.probes) for result in generated)
        measurements["a"] = row
    measurements["b"], binary = stage_row(
        f"(b) binary, logits, batched engine, batch {args.batch_size}", "binary", batched_judge
    )
    measurements["c"], exhaustive = stage_row("(c) exhaustive, logits, one-pass engine", "exhaustive", one_pass_judge)
    measurements["e"], binary_one_pass = stage_row("(e) binary, logits, one-pass engine", "binary", one_pass_judge)
    measurements["d"], full_scores = timed(
        "(d) floor: full trace, 1 forward, batch 1",
        lambda: [floor_judge.score_encoded([ids])[0] for ids in full_prompts],
        len(examples),
    )
    measurements["d"].prefixes_scored = len(examples)

    # Where (c)'s time goes beyond the floor: the one-pass engine alone (no stage), all prefixes and
    # the longest only (one prefill + one tail); the difference is the m - 1 further tails, which
    # share one masked forward per trace.
    items = [(e.record.question, e.units, range(1, e.units.m + 1)) for e in examples]
    engine_all, _ = timed("one-pass engine, every prefix", lambda: one_pass_judge.prefix_scores(items), len(examples))
    longest = [(q, units, [units.m]) for q, units, _ in items]
    engine_longest, _ = timed(
        "one-pass engine, longest prefix", lambda: one_pass_judge.prefix_scores(longest), len(examples)
    )

    baseline = measurements.get("a", measurements["b"])
    floor = measurements["d"]
    print(
        f"\n| measurement | wall s | CPU s | examples/s | prefixes scored/example | verdicts consulted/example "
        f"| x {baseline.label[:3]} examples/s | x floor time | load 1m | peak RSS MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def per_example(count: int | None, m: Measurement) -> str:
        return "-" if not count else f"{count / m.examples:.1f}"

    for m in measurements.values():
        rate = m.examples / m.wall_s
        print(
            f"| {m.label} | {m.wall_s:.2f} | {m.cpu_s:.2f} | {rate:.3f} | {per_example(m.prefixes_scored, m)} "
            f"| {per_example(m.verdicts, m)} | {rate / (baseline.examples / baseline.wall_s):.1f} "
            f"| {m.wall_s / floor.wall_s:.2f} | {m.load_1m:.2f} | {m.peak_rss_mib:.0f} |"
        )

    c, e = measurements["c"], measurements["e"]
    every_prefix = all(len(r["probes"]) == r["m"] and r["prefixes_scored"] >= r["m"] for r in exhaustive)
    print("\ngoals:")
    if "a" in measurements:
        speedup = (c.examples / c.wall_s) / (baseline.examples / baseline.wall_s)
        print(
            f"- (c)/(a) examples/s = {speedup:.1f} (goal >= {GOAL_SPEEDUP:g}), every prefix judged: {every_prefix} "
            f"-> {'met' if speedup >= GOAL_SPEEDUP and every_prefix else 'MISSED'}"
        )
    else:
        print(f"- (c)/(a): (a) skipped; every prefix judged by (c): {every_prefix}")
    print(
        f"- (c)/(d) time = {c.wall_s / floor.wall_s:.2f} (goal <= {GOAL_FLOOR:g}) "
        f"-> {'met' if c.wall_s <= GOAL_FLOOR * floor.wall_s else 'MISSED'}"
    )
    print(
        f"- (e)/(c) time = {e.wall_s / c.wall_s:.2f} (goal <= 1, binary on one-pass no slower) "
        f"-> {'met' if e.wall_s <= c.wall_s else 'MISSED'}"
    )

    tails = sum(example.units.m for example in examples)
    extra_tails_s = engine_all.wall_s - engine_longest.wall_s
    tail_tokens = len(floor_judge.prefix_tokens(examples[0].record.question, examples[0].units)[2])
    print(
        f"\nwhere (c)'s {c.wall_s:.2f} s go (floor (d) {floor.wall_s:.2f} s, "
        f"{sum(len(p) for p in full_prompts)} prompt tokens in all):"
    )
    print(
        f"- one-pass engine alone, longest prefix only (a prefill and a 1-tail forward per trace): "
        f"{engine_longest.wall_s:.2f} s"
    )
    print(
        f"- one-pass engine alone, every prefix: {engine_all.wall_s:.2f} s; the {tails - len(examples)} further "
        f"tails ({tail_tokens} tokens each, all of a trace's in one masked forward over its cache) cost "
        f"{extra_tails_s:.2f} s, ~{1000 * extra_tails_s / max(1, tails - len(examples)):.1f} ms each"
    )
    print(
        f"- the stage around the engine (segmenting, unit-wise tokenizing, thresholds, search, store): "
        f"{c.wall_s - engine_all.wall_s:.2f} s; the unit-wise tokenization of the floor's prompts alone took "
        f"{tokenize_s:.2f} s (not in (d))"
    )

    # Both engines must give the same scores; compare them on every prefix (b) scored (its probes and,
    # with relative_to_full, the full trace), against (c)'s one-pass scores of every prefix.
    one_pass_scores = {(r["id"], p["k"]): p["score"] for r in exhaustive for p in r["probes"]}
    batched_scores = {(r["id"], p["k"]): p["score"] for r in binary for p in r["probes"]}
    batched_scores.update({(r["id"], r["m"]): r["full_score"] for r in binary if r["full_score"] is not None})
    differences = [abs(score - one_pass_scores[key]) for key, score in batched_scores.items()]
    floor_differences = [abs(score - one_pass_scores[e.id, e.units.m]) for e, score in zip(examples, full_scores)]
    print(
        f"\nmax |score difference|, one-pass vs batched engine, over the {len(differences)} prefixes both scored: "
        f"{max(differences):.2e}; floor (d) vs one-pass on the full traces: {max(floor_differences):.2e}"
    )

    print(
        "\n| trace | m | full score | k (a) generate | k (b) binary batched | k (c) exhaustive | monotone (c) "
        "| k (e) binary one-pass | probes (a) | probes (b) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---|---|")

    def chosen(k: int, fallback: bool) -> str:
        return f"{k}{' (fallback)' if fallback else ''}"

    for i, example in enumerate(examples):
        k_a = "-" if generated is None else chosen(generated[i].chosen_k, generated[i].fallback)
        probes_a = (
            "-" if generated is None else " ".join(f"{p.k}{'E' if p.sufficient else 'N'}" for p in generated[i].probes)
        )
        probes_b = " ".join(f"{p['k']}{'E' if p['sufficient'] else 'N'}" for p in binary[i]["probes"])
        print(
            f"| {example.id} | {example.units.m} | {full_scores[i]:.2f} | {k_a} "
            f"| {chosen(binary[i]['chosen_k'], binary[i]['fallback'])} "
            f"| {chosen(exhaustive[i]['chosen_k'], exhaustive[i]['fallback'])} | {exhaustive[i]['monotone']} "
            f"| {chosen(binary_one_pass[i]['chosen_k'], binary_one_pass[i]['fallback'])} | {probes_a} | {probes_b} |"
        )

    if generated is None:
        return
    generate_verdicts = {(i, p.k): p.sufficient for i, r in enumerate(generated) for p in r.probes}
    binary_verdicts = {(i, p["k"]): p["sufficient"] for i, r in enumerate(binary) for p in r["probes"]}
    scores = {(i, p["k"]): p["score"] for i, r in enumerate(exhaustive) for p in r["probes"]}
    shared = sorted(generate_verdicts.keys() & binary_verdicts.keys())
    print("\nverdict agreement, generate (a) vs logits:")
    print(
        f"- probes judged by both (a) and (b), rule {args.threshold_kind} {args.threshold_value:g}: "
        + agreement([(generate_verdicts[key], binary_verdicts[key]) for key in shared])
    )
    absolute = option("judge/threshold", "absolute")  # conf/truncation/judge/threshold/absolute.yaml's value
    for label, value_of in (
        (f"absolute {absolute.value:g}", lambda i: absolute.value),
        (f"relative_to_full {CALIBRATED_VALUE:g}", lambda i: full_scores[i] - CALIBRATED_VALUE),
    ):
        pairs = [(verdict, scores[i, k] >= value_of(i)) for (i, k), verdict in sorted(generate_verdicts.items())]
        print(f"- every (a) probe vs the exhaustive scores of (c), rule {label}: {agreement(pairs)}")
    replies = [p.reply or "" for r in generated for p in r.probes]
    distinct = sorted(set(replies), key=replies.index)
    print(
        f"- (a) replies: {sum(is_sufficient_reply(generate_judge.prompt, r) for r in replies)}/{len(replies)} "
        f"parsed ENOUGH, {len(distinct)} distinct; first ones: " + " | ".join(repr(r[:80]) for r in distinct[:3])
    )


if __name__ == "__main__":
    main()
