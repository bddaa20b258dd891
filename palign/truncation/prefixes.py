"""Each trace's prefix search with a judge: what decides a prefix (`TruncationSettings`, the
store's identity), the judge built from its config node (`build_judge`), and the search itself
(`search_prefixes`), which the in-process stage (stage.py) and every Ray actor (ray_judge.py) run
alike, so both give the same verdicts, scores and prefixes (PAPER.md §2.1).

It sits below both callers: the stage builds a Ray judge pool, and the pool's actors run this
module's search; neither imports the other's internals (pyproject.toml: the truncation layers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.truncation.judge import SCORE_TOLERANCE, SufficiencyJudge, ThresholdRule
from palign.truncation.search import Verdict, create_search, fixed_ratio_k, run_searches
from palign.truncation.units import Segmentation

log = logging.getLogger(__name__)

# Stored truncation records depend on this code as well as on the settings: bump CODE_VERSION when a
# change here or in the stage (stage.py) changes what is stored, so caches written by older code are never reused
# (tests/test_stage_versions.py notices a change to the logic that did not bump it).
CODE_VERSION = 2  # 2: probes over the judge's context count as not sufficient; generate-mode replies stop at every eos

FIXED_RATIO = "fixed_ratio"


@dataclass(kw_only=True)
class TruncationSettings:
    """What decides a prefix (the artifact's identity), which traces are judged, and how the work is
    batched: the `truncation` node's fields (palign/schema.py documents each and holds its default)
    and the baseline's ratio, gathered by `PrefixTruncation.from_config`.

    max_context_tokens: what a probe's prompt and reply may take (None: the judge model's context);
    longer probes count as not sufficient (see the module docstring).
    """

    granularity: str
    granularity_options: dict[str, Any]
    search: str
    ratio: float | None  # fixed_ratio only
    judge_identity: dict[str, Any]
    judge_prompt: dict[str, Any]
    mode: str
    threshold: dict[str, Any]
    max_new_tokens: int
    batch_size: int
    chunk_size: int
    max_context_tokens: int | None

    def __post_init__(self) -> None:
        cap = self.max_context_tokens
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 2):
            raise ValueError("truncation.judge.max_context_tokens must be a number of tokens >= 2 or null (the judge "
                             f"model's context), got {cap!r}")

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "code_version": CODE_VERSION,
            "granularity": self.granularity,
            "granularity_options": self.granularity_options,
            "search": self.search,
        }
        if self.search == FIXED_RATIO:
            ident["ratio"] = self.ratio
            return ident
        ident.update(judge=self.judge_identity, prompt=self.judge_prompt, mode=self.mode, context=self.max_context_tokens)
        if self.mode == "logits":
            ident["threshold"] = self.threshold
        else:
            ident["max_new_tokens"] = self.max_new_tokens
        return ident


def build_judge(judge: Mapping[str, Any], judge_prompt: Mapping[str, Any], cache_dir: str | Path,
                vllm: Mapping[str, Any], backend: str) -> SufficiencyJudge:
    """The sufficiency judge of the `truncation.judge` node (without its `ray` block) on `backend`
    (hf or vllm), its model loaded here: called by the stage only when a trace needs judging, and
    by every Ray actor of the ray back end."""
    from palign.llm.models import ModelSpec, context_length, load_inference_model, load_tokenizer, resolve_model_path
    from palign.truncation.judge import HFScorer, JudgePrompt

    spec = ModelSpec.from_config(judge["model"])
    prompt = JudgePrompt.from_config(dict(judge_prompt))
    # one context for every back end (the model's, or the knob), so hf, vllm and ray judge the same probes
    context = judge["max_context_tokens"] or context_length(resolve_model_path(spec, cache_dir))
    shared = {"mode": judge["mode"], "max_new_tokens": judge["max_new_tokens"], "batch_size": judge["batch_size"],
              "context_tokens": context}
    if backend == "vllm":
        engine_length = (vllm or {}).get("max_model_len")
        if engine_length and engine_length < context:
            raise ValueError(f"vllm.max_model_len={engine_length} is below the judge's context of {context} tokens "
                             "(truncation.judge.max_context_tokens, else the model's): vLLM would refuse the longest "
                             f"probes; set truncation.judge.max_context_tokens={engine_length} (or raise vllm.max_model_len)")
        from palign.llm.vllm_backend import vllm_backend

        # vLLM has no one-pass scorer: the judge scores each prefix as its own request (vLLM's prefix
        # cache shares the rest) and so follows the search, never scoring a trace's every prefix
        if judge["engine"] != "batched":
            log.info("truncation: the vLLM judge scores only the prefixes the search probes "
                     "(truncation.judge.engine=%s has no meaning on vLLM)", judge["engine"])
        return SufficiencyJudge.on_backend(vllm_backend(spec, cache_dir, vllm), prompt, engine=judge["engine"], **shared)
    if backend != "hf":
        raise ValueError(f"truncation.judge.backend: a judge is built on hf or vllm, got '{backend}'")
    scorer = HFScorer(load_inference_model(spec, cache_dir), load_tokenizer(spec, cache_dir), batch_size=judge["batch_size"],
                      max_tail_tokens=judge["max_tail_tokens"], chat_template_kwargs=spec.chat_template_kwargs)
    return SufficiencyJudge(scorer, scorer.tokenizer, prompt, engine=judge["engine"],
                            chat_template_kwargs=spec.chat_template_kwargs, **shared)


def search_prefixes(settings: TruncationSettings, judge: SufficiencyJudge | None, questions: Sequence[str],
                    segs: Sequence[Segmentation], *, quantile_threshold: float | None = None,
                    on_finished: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
    """Each trace's search outcome (chosen_k, probes, fallback, monotone, full_score, full_score_k,
    threshold, fitting_k, prefixes_scored; plain JSON): the fixed ratio, or the configured search with
    `judge`, all the traces advancing together in judge batches of `settings.batch_size`. A quantile
    rule's threshold is `quantile_threshold`, calibrated beforehand (`PrefixTruncation.run`).

    A probe longer than the judge's context (k > fitting_k) is not sent and counts as not sufficient
    (stored with `over_context: true`); a relative-to-full threshold is taken from the longest prefix
    that fits (`full_score_k`, the whole trace when it fits)."""
    memo: list[dict[int, float]] = [{} for _ in segs]  # logits-mode scores by prefix length
    full_scores: list[float | None] = [None] * len(segs)
    full_ks: list[int | None] = [None] * len(segs)
    thresholds: list[float | None] = [None] * len(segs)
    fitting: list[int | None] = [None] * len(segs)
    if settings.search == FIXED_RATIO:
        chosen = [(fixed_ratio_k(s.m, settings.ratio), [], False, None) for s in segs]
        if on_finished is not None:
            on_finished(len(segs))
    else:
        fitting = [judge.longest_fitting_prefix(q, s) for q, s in zip(questions, segs, strict=True)]

        def memoized_scores(requests: Sequence[tuple[int, int]]) -> list[dict[int, float]]:
            """Scores per example, computing each prefix once; the one-pass engine scores a trace's
            every fitting prefix on first touch (the cost of the longest of them)."""
            needed: dict[int, set[int]] = {}
            for i, k in requests:
                if k not in memo[i] and k <= fitting[i]:
                    needed.setdefault(i, set()).add(k)
            if judge.engine == "one_pass":
                needed = {i: set(range(1, fitting[i] + 1)) - set(memo[i]) for i in needed}
            order = sorted(needed)
            found = judge.prefix_scores([(questions[i], segs[i], sorted(needed[i])) for i in order])
            for i, values in zip(order, found):
                memo[i].update(values)
            return memo

        if settings.mode == "logits":
            rule = ThresholdRule.from_config(settings.threshold)
            if rule.kind == "absolute":
                thresholds = [rule.value] * len(segs)
            elif rule.kind == "relative_to_full":
                # all references in one judge call: the full trace, or its longest prefix that fits
                full_ks = [min(s.m, fitting[i]) or None for i, s in enumerate(segs)]
                memoized_scores([(i, k) for i, k in enumerate(full_ks) if k is not None])
                full_scores = [memo[i][k] if k is not None else None for i, k in enumerate(full_ks)]
                thresholds = [score - rule.value if score is not None else None for score in full_scores]
            else:
                if quantile_threshold is None:
                    raise ValueError("a quantile threshold needs its calibrated value (quantile_threshold)")
                thresholds = [quantile_threshold] * len(segs)
        states = [create_search(settings.search, s.m) for s in segs]

        def judge_batch(requests: Sequence[tuple[int, int]]) -> list[Verdict]:
            verdicts: dict[tuple[int, int], Verdict] = {
                (i, k): Verdict(False, None, None) for i, k in requests if k > fitting[i]}  # over the context
            sent = [(i, k) for i, k in requests if k <= fitting[i]]
            if settings.mode == "generate":
                replies = judge.judge([(questions[i], segs[i].prefix(k)) for i, k in sent]) if sent else []
                verdicts.update(zip(sent, replies))
            else:
                memoized_scores(sent)
                verdicts.update(((i, k), Verdict(memo[i][k] >= thresholds[i] - SCORE_TOLERANCE, memo[i][k], None))
                                for i, k in sent)
            return [verdicts[request] for request in requests]

        results = run_searches(states, judge_batch, settings.batch_size, on_finished=on_finished)
        chosen = [(r.chosen_k, r.probes, r.fallback, r.monotone) for r in results]
    return [
        {"chosen_k": k, "fallback": fallback, "monotone": monotone, "full_score": full_scores[i],
         "full_score_k": full_ks[i], "threshold": thresholds[i], "fitting_k": fitting[i],
         "probes": [{"k": p.k, "sufficient": p.sufficient, "score": p.score, "reply": p.reply,
                     "over_context": fitting[i] is not None and p.k > fitting[i]} for p in probes],
         "prefixes_scored": len(memo[i]) if memo[i] else sum(fitting[i] is None or p.k <= fitting[i] for p in probes)}
        for i, (k, probes, fallback, monotone) in enumerate(chosen)
    ]


def judged_probes(outcome: Mapping[str, Any]) -> int:
    """The probes of a search outcome (or stored row) that the judge was sent (none over its context)."""
    return sum(not probe.get("over_context", False) for probe in outcome["probes"])
