"""Benchmark of `backend: ray` (palign/llm/ray_backend.py) against the in-process Hugging Face path.

--prompts CHAMP problems with the paper's evaluation prompt (`conf/prompts/paper.yaml`), greedy
decoding up to --max-new-tokens (so every row generates the same text, which is checked), one
chunk of all prompts as `complete_missing` would send it. At the same total number of threads
(--threads):

  in-process         LocalChatBackend: one model, torch with --threads threads;
  ray, N workers     RayChatBackend on a local cluster of --threads CPUs: N actors with
                     --threads / N threads each, each loading its own copy of the model.

Ray Data starts its actors once per call (a stage sends all its missing prompts in one call), so
a Ray row's wall time includes starting N actors and loading N models once; `startup s` is a
one-prompt, one-token call (almost only that overhead), and `generate s` the rest. Each row prints
wall seconds, generated tokens/s and the speed-up over the in-process path.

The sufficiency judge (`truncation.judge.backend: ray`, palign/truncation/ray_judge.py) the same
way: --judge-traces CHAMP solutions, sentence units, binary search with the one-pass logits judge,
--judge-chunk traces per chunk; in process (one judge, --threads threads) against 1 and 2 Ray
workers, each building its own judge. Wall time includes loading the judge(s) and, for Ray, starting
the actors; the prefixes chosen are checked equal.

Run from the repository root (`pip install 'palign[ray]'`):
    python -m experiments.bench.ray_inference [--model smollm2_135m|tiny_random] [--prompts 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial

from omegaconf import OmegaConf

from palign.config import CONFIG_DIR
from palign.llm.chat import instruction_prompt
from palign.llm.generation import SamplingConfig
from palign.llm.hf_backend import LocalChatBackend
from palign.llm.models import ModelSpec, load_inference_model, load_tokenizer
from palign.teachers.sources import champ_problems

DEFAULT_CACHE = os.environ.get("PALIGN_CACHE", str(CONFIG_DIR.parent / "outputs" / "cache"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/student/ model (smollm2_135m, tiny_random)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="sampling.batch_size: prompts per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="total torch threads (and the Ray cluster's CPUs)")
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    parser.add_argument("--judge-traces", type=int, default=16, help="CHAMP traces for the judge (0: no judge rows)")
    parser.add_argument("--judge-chunk", type=int, default=4, help="truncation.search.chunk_size: traces per chunk")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE)
    args = parser.parse_args()

    import ray
    import torch

    from palign.llm.ray_backend import RayChatBackend

    spec = ModelSpec.from_config(OmegaConf.load(CONFIG_DIR / "student" / f"{args.model}.yaml"))
    tokenizer = load_tokenizer(spec, args.cache_dir)
    prompts = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "prompts" / "paper.yaml"))
    texts = [instruction_prompt(prompts, problem) for _, problem, _ in champ_problems()[: args.prompts]]
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, do_sample=False, repetition_penalty=1.0, batch_size=args.batch_size
    )
    print(
        f"{len(texts)} CHAMP evaluation prompts, {args.model}, greedy up to {args.max_new_tokens} new tokens, "
        f"batch {args.batch_size}, {args.threads} threads in total, load 1m {os.getloadavg()[0]:.2f}"
    )

    def tokens(outputs) -> int:
        return sum(min(g.num_tokens + g.finished, args.max_new_tokens) for samples in outputs for g in samples)

    torch.set_num_threads(args.threads)
    local = LocalChatBackend(lambda: load_inference_model(spec, args.cache_dir), tokenizer, spec.chat_template_kwargs)
    started = time.perf_counter()
    local.complete(texts[:1], SamplingConfig(max_new_tokens=1, do_sample=False, batch_size=1))  # load and warm up
    startup = time.perf_counter() - started
    started = time.perf_counter()
    expected = local.complete(texts, sampling)
    wall = time.perf_counter() - started
    rows = [("in-process", startup, wall, tokens(expected))]

    with tempfile.TemporaryDirectory(prefix="ray-") as temp:
        ray.init(num_cpus=args.threads, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
        try:
            for workers in (int(n) for n in args.workers.split(",")):
                backend = RayChatBackend(
                    {**vars(spec)},
                    args.cache_dir,
                    tokenizer,
                    num_workers=workers,
                    num_cpus_per_worker=args.threads / workers,
                    num_gpus_per_worker=0,
                    engine="hf",
                    address=None,
                    batch_size=args.batch_size,
                    stage="bench",
                )
                started = time.perf_counter()
                backend.complete(texts[:1], SamplingConfig(max_new_tokens=1, do_sample=False, batch_size=1))
                startup = time.perf_counter() - started
                started = time.perf_counter()
                outputs = backend.complete(texts, sampling)
                wall = time.perf_counter() - started
                same = [[g.text for g in s] for s in outputs] == [[g.text for g in s] for s in expected]
                rows.append(
                    (
                        f"ray, {workers} worker{'s' * (workers > 1)}{'' if same else ' (TEXT DIFFERS)'}",
                        startup,
                        wall,
                        tokens(outputs),
                    )
                )
            judged = judge_rows(args, spec, tokenizer) if args.judge_traces else []
        finally:
            ray.shutdown()

    print(
        "| configuration | startup s | wall s (startup included for ray) | generate s | tokens | tokens/s "
        "| x in-process |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    baseline = rows[0][3] / rows[0][2]
    for label, startup, wall, count in rows:
        generate_s = wall if label == "in-process" else max(wall - startup, 0.0)
        print(
            f"| {label} | {startup:.1f} | {wall:.1f} | {generate_s:.1f} | {count} | {count / wall:.1f} | "
            f"{count / wall / baseline:.2f} |"
        )

    if judged:
        print(
            f"\njudge: {args.judge_traces} CHAMP traces, chunks of {args.judge_chunk}, binary search, one-pass logits"
        )
        print("| configuration | wall s (judge load included) | traces/s | judge calls | x in-process |")
        print("|---|---:|---:|---:|---:|")
        for label, wall, calls in judged:
            print(f"| {label} | {wall:.1f} | {args.judge_traces / wall:.2f} | {calls} | {judged[0][1] / wall:.2f} |")


def judge_rows(args, spec, tokenizer) -> list[tuple[str, float, int]]:
    """(label, wall s, judge calls) of the truncation stage in process and over 1 and 2 Ray workers."""
    import torch

    from palign.llm.hf_backend import HFBackend
    from palign.llm.ray_backend import RayBackend
    from palign.schema import Judge, JudgePrompt, defaults
    from palign.teachers.sources import ChampTeacher
    from palign.truncation.judge import AbsoluteThreshold
    from palign.truncation.prefixes import AdaptivePrefix
    from palign.truncation.ray_judge import RayJudgePool
    from palign.truncation.search import BinaryPrefixSearch
    from palign.truncation.stage import PrefixTruncation, build_judge
    from palign.truncation.units import Sentences

    records = ChampTeacher.with_defaults(limit=args.judge_traces).load().records
    prompt = JudgePrompt(
        **OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "truncation" / "judge_prompt" / "paper.yaml"))
    )

    def node(backend) -> Judge:  # the logits judge at the schema's defaults, absolute threshold 0, 8 per forward
        return Judge(
            **{
                **defaults(Judge),
                "model": spec,
                "max_new_tokens": 8,
                "batch_size": 8,
                "backend": backend,
                "threshold": AbsoluteThreshold(value=0.0),
            }
        )

    def stage_of(judge: Judge, store: str, **judging) -> PrefixTruncation:
        return PrefixTruncation(
            AdaptivePrefix(),
            Sentences(),
            store,
            tokenizer,
            chunk_size=args.judge_chunk,
            search=BinaryPrefixSearch,
            judge=judge,
            judge_prompt=prompt,
            progress=False,
            **judging,
        )

    torch.set_num_threads(args.threads)
    rows, expected = [], None
    for workers in (0, *(int(n) for n in args.workers.split(","))):
        with tempfile.TemporaryDirectory(prefix="judge-") as store:
            if workers == 0:
                judge = node(HFBackend())
                stage = stage_of(
                    judge, store, judge_factory=partial(build_judge, judge, prompt, args.cache_dir, judge.backend)
                )
            else:
                ray_cfg = {
                    "num_workers": workers,
                    "num_cpus_per_worker": args.threads / workers,
                    "num_gpus_per_worker": 0,
                    "engine": "hf",
                    "address": None,
                    "batch_size": 1,
                }
                judge = node(RayBackend(workers=ray_cfg, vllm={}))
                stage = stage_of(
                    judge,
                    store,
                    judge_pool=RayJudgePool(judge, prompt, args.cache_dir, judge.backend, BinaryPrefixSearch),
                )
            started = time.perf_counter()
            prefixes = [row["prefix"] for row in stage.run(records)]
            wall = time.perf_counter() - started
        expected = prefixes if expected is None else expected
        label = "in-process" if workers == 0 else f"ray, {workers} worker{'s' * (workers > 1)}"
        rows.append((label + ("" if prefixes == expected else " (PREFIXES DIFFER)"), wall, stage.judge_calls))
    return rows


if __name__ == "__main__":
    main()
