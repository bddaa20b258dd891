"""Benchmark of batched generation (prefix continuation and evaluation, PAPER.md §2.2 and §3).

SmolLM2-135M-Instruct on CPU answers --prompts CHAMP problems, rendered as the stage does it
(`conf/prompts/paper.yaml`, through the chat template): `--kind continuation` (default) is the
alignment stage's prompt, the problem plus a prefix of GPT-4's solution cut after a seeded random
share of its sentences, so prompt lengths vary as they do there; `--kind evaluation` is the paper's
instruction plus the problem. Sampling is the paper's (`conf/evaluation/paper.yaml`: T 0.6, top-p 0.9,
repetition penalty 1.05) up to --max-new-tokens. It measures in one process, on the same prompts:

  batch 1            one prompt at a time (the authors' HF loop shape);
  batch N, unsorted  left-padded batches in the given order;
  batch N, sorted    palign's `generate`: batches of similar prompt length, left-padded.

Each row prints wall seconds, generated tokens/s (tokens up to and including the end of turn, or
the cap), the speed-up over batch 1, and this process's peak RSS so far. Sampling differs per
row (other batch shapes draw other random numbers), so token counts differ a little; tokens/s
accounts for it.

Run from the repository root:
    python -m experiments.bench.generation [--kind continuation|evaluation] [--prompts 16] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import time

import torch
from omegaconf import OmegaConf

from palign.alignment.continuation import continuation_prompt
from palign.config import CONFIG_DIR
from palign.llm.chat import encode_user_turn, instruction_prompt
from palign.llm.generation import SamplingConfig, generate
from palign.llm.models import ModelSpec, load_model, load_tokenizer
from palign.schema import Evaluation
from palign.teachers.sources import ChampTeacher, champ_problems
from palign.truncation.units import split_sentences

DEFAULT_CACHE = os.environ.get("PALIGN_CACHE", str(CONFIG_DIR.parent / "outputs" / "cache"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--kind", choices=("continuation", "evaluation"), default="continuation")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE)
    args = parser.parse_args()

    spec = ModelSpec.from_config(OmegaConf.load(CONFIG_DIR / "student" / "smollm2_135m.yaml"))
    tokenizer, model = load_tokenizer(spec, args.cache_dir), load_model(spec, args.cache_dir)
    prompts = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "prompts" / "paper.yaml"))
    paper = OmegaConf.to_container(
        OmegaConf.structured(Evaluation).sampling
    )  # the schema's: the paper's evaluation sampling
    if args.kind == "evaluation":
        texts = [instruction_prompt(prompts, problem) for _, problem, _ in champ_problems()[: args.prompts]]
    else:
        draw = random.Random(0)
        texts = []
        for record in ChampTeacher.with_defaults().load().records[: args.prompts]:
            units = split_sentences(record.long_cot)
            texts.append(
                continuation_prompt(prompts, record.question, units.prefix(max(1, round(draw.random() * units.m))))
            )
    lengths = [len(encode_user_turn(tokenizer, text, spec.chat_template_kwargs)) for text in texts]
    print(
        f"{len(texts)} CHAMP {args.kind} prompts of {min(lengths)}-{max(lengths)} tokens, "
        f"up to {args.max_new_tokens} new tokens, "
        f"torch threads {torch.get_num_threads()}, load 1m {os.getloadavg()[0]:.2f}"
    )

    def sampling(batch_size: int) -> SamplingConfig:
        return SamplingConfig(
            **{**paper, "num_samples": 1, "max_new_tokens": args.max_new_tokens, "batch_size": batch_size}
        )

    def unsorted(batch_size: int):
        out = []
        for start in range(0, len(texts), batch_size):  # one call per batch keeps the given order
            out += generate(model, tokenizer, texts[start : start + batch_size], sampling(batch_size))
        return out

    rows = (
        ("batch 1", lambda: generate(model, tokenizer, texts, sampling(1))),
        (f"batch {args.batch_size}, unsorted", lambda: unsorted(args.batch_size)),
        (
            f"batch {args.batch_size}, sorted (palign)",
            lambda: generate(model, tokenizer, texts, sampling(args.batch_size)),
        ),
    )
    generate(model, tokenizer, texts[:1], sampling(1))  # warm-up
    print("| configuration | wall s | generated tokens | tokens/s | x batch 1 | finished | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    baseline = None
    for label, run in rows:
        started = time.perf_counter()
        outputs = run()
        wall = time.perf_counter() - started
        tokens = sum(min(g.num_tokens + g.finished, args.max_new_tokens) for samples in outputs for g in samples)
        rate = tokens / wall
        baseline = baseline or rate
        finished = sum(g.finished for samples in outputs for g in samples)
        print(
            f"| {label} | {wall:.1f} | {tokens} | {rate:.1f} | {rate / baseline:.2f} | {finished}/{len(outputs)} "
            f"| {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} |"
        )


if __name__ == "__main__":
    main()
