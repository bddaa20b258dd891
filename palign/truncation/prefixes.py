"""Each trace's prefix: how a baseline gets it (its prefix policy, the `baseline.prefix` node), what
names stage 1's store (`store_identity`), the judge built from its config node (`build_judge`), and
the judge's search (`search_prefixes`), which the in-process stage (stage.py) and every Ray actor
(ray_judge.py) run alike, so both give the same verdicts, scores and prefixes (PAPER.md §2.1).

A baseline names its prefix policy by `_target_` (conf/baseline/): `AdaptivePrefix` (P-ALIGN: the
shortest prefix the judge accepts, found by the `truncation.search`), `FixedRatioPrefix` (the first
ceil(ratio * m) units, PAPER.md §6) or `NoPrefix` (no stage 1). Each says which fields of the
`truncation` node it reads (`reads`: palign/runs.py leaves the others out of the run's identity and
refuses them on the command line), names what decides its prefixes (`identity`) and chooses them
(`choose`). A new policy is one class here and a `prefix:` node in a baseline's YAML file.

It sits below both callers: the stage builds a Ray judge pool, and the pool's actors run this
module's search; neither imports the other's internals (pyproject.toml: the truncation layers).
"""

from __future__ import annotations

import logging
from abc import ABC
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from palign.llm.backends import Backend
from palign.schema import Judge, JudgePrompt
from palign.truncation.judge import SCORE_TOLERANCE, SufficiencyJudge, Threshold
from palign.truncation.search import PrefixSearch, Verdict, fixed_ratio_k, run_searches
from palign.truncation.units import Segmentation, Splitter

log = logging.getLogger(__name__)

# Stored truncation records depend on this code as well as on the settings: bump CODE_VERSION when a
# change here or in the stage (stage.py) changes what is stored, so caches written by older code are never reused
# (tests/integration/test_stage_versions.py notices a change to the logic that did not bump it).
CODE_VERSION = 2  # 2: probes over the judge's context count as not sufficient; generate-mode replies stop at every eos

# a search factory: the `truncation.search` node's class with its options (`_partial_: true`), called with a trace's m
SearchFactory = Callable[[int], PrefixSearch]


def search_identity(search: SearchFactory) -> dict[str, Any]:
    """A search factory (a PrefixSearch class, or one partially applied to its options) by its
    strategy's name and its options (none for the paper's searches: nothing then, as before options)."""
    options = dict(getattr(search, "keywords", None) or {})
    strategy = getattr(search, "func", search).strategy
    return {"search": strategy, **({"search_options": options} if options else {})}


def store_identity(
    granularity: Splitter,
    prefix: PrefixPolicy,
    search: SearchFactory | None,
    judge: Judge | None,
    judge_prompt: JudgePrompt | None,
) -> dict[str, Any]:
    """Everything that decides stage 1's stored records (its store's fingerprint, palign/artifacts/stores.py:
    stage_folder), from the typed nodes: the code version, the units, and the policy's own part."""
    return {
        "code_version": CODE_VERSION,
        "granularity": granularity.name,
        "granularity_options": granularity.options(),
        **prefix.identity(search, judge, judge_prompt),
    }


# -- prefix policies: the `baseline.prefix` node -------------------------------------------------------
class PrefixPolicy(ABC):
    """How a baseline gets its teacher prefixes (conf/baseline/, the `prefix` node)."""

    # the fields of the `truncation` node (palign/schema.py: Truncation) this policy reads
    reads: ClassVar[tuple[str, ...]]

    @property
    def judged(self) -> bool:
        """Whether its prefixes need the judge (the stage then builds one, or a Ray pool of them)."""
        return "judge" in self.reads

    def identity(
        self, search: SearchFactory | None, judge: Judge | None, judge_prompt: JudgePrompt | None
    ) -> dict[str, Any]:
        """What decides the prefixes besides the units (`store_identity`)."""
        raise TypeError(f"{type(self).__name__} makes no prefixes")

    def choose(
        self,
        segs: Sequence[Segmentation],
        questions: Sequence[str],
        *,
        search: SearchFactory | None,
        threshold: Threshold | None,
        judge: Callable[[], SufficiencyJudge],
        quantile_threshold: float | None,
        on_finished: Callable[[int], Any] | None,
    ) -> list[dict[str, Any]]:
        """Each trace's outcome, as `search_prefixes` gives it (the judge is built only when called)."""
        raise TypeError(f"{type(self).__name__} makes no prefixes")


class NoPrefix(PrefixPolicy):
    """No teacher prefix: stage 1 does not run (the SFT baselines, student_only)."""

    reads: ClassVar[tuple[str, ...]] = ()


class AdaptivePrefix(PrefixPolicy):
    """P-ALIGN's prefix: the shortest one the judge accepts, found by the `truncation.search` over the
    `truncation.granularity`'s units (PAPER.md §2.1)."""

    reads: ClassVar[tuple[str, ...]] = ("granularity", "search", "judge", "judge_prompt", "chunk_size")

    def identity(
        self, search: SearchFactory | None, judge: Judge | None, judge_prompt: JudgePrompt | None
    ) -> dict[str, Any]:
        from palign.llm.models import ModelSpec

        ident: dict[str, Any] = {
            **search_identity(search),
            "judge": ModelSpec.from_config(judge.model).identity(),
            "prompt": asdict(judge_prompt),
            "mode": judge.mode,
            "context": judge.max_context_tokens,
        }
        if judge.mode == "logits":
            ident["threshold"] = judge.threshold.identity()
        else:
            ident["max_new_tokens"] = judge.max_new_tokens
        return ident

    def choose(
        self,
        segs: Sequence[Segmentation],
        questions: Sequence[str],
        *,
        search: SearchFactory | None,
        threshold: Threshold | None,
        judge: Callable[[], SufficiencyJudge],
        quantile_threshold: float | None,
        on_finished: Callable[[int], Any] | None,
    ) -> list[dict[str, Any]]:
        return search_prefixes(
            search, threshold, judge(), questions, segs, quantile_threshold=quantile_threshold, on_finished=on_finished
        )


@dataclass(frozen=True)
class FixedRatioPrefix(PrefixPolicy):
    """The fixed-ratio baseline: the first ceil(ratio * m) units of every trace, no judge (PAPER.md §6)."""

    reads: ClassVar[tuple[str, ...]] = ("granularity", "chunk_size")
    ratio: float

    def __post_init__(self) -> None:
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"baseline.prefix.ratio: the share of units kept is a number in (0, 1], got {ratio!r}")
        object.__setattr__(self, "ratio", float(ratio))  # 1 and 1.0 are one ratio (and one fingerprint)

    def identity(
        self, search: SearchFactory | None, judge: Judge | None, judge_prompt: JudgePrompt | None
    ) -> dict[str, Any]:
        # "search: fixed_ratio" names these stores as it did when the ratio was a pseudo-search (same folders)
        return {"search": "fixed_ratio", "ratio": self.ratio}

    def choose(
        self,
        segs: Sequence[Segmentation],
        questions: Sequence[str],
        *,
        search: SearchFactory | None,
        threshold: Threshold | None,
        judge: Callable[[], SufficiencyJudge],
        quantile_threshold: float | None,
        on_finished: Callable[[int], Any] | None,
    ) -> list[dict[str, Any]]:
        outcomes = [_outcome(fixed_ratio_k(seg.m, self.ratio)) for seg in segs]
        if on_finished is not None:
            on_finished(len(segs))
        return outcomes


def _outcome(
    chosen_k: int,
    probes: Sequence[Any] = (),
    *,
    fallback: bool = False,
    monotone: bool | None = None,
    full_score: float | None = None,
    full_score_k: int | None = None,
    threshold: float | None = None,
    fitting_k: int | None = None,
    prefixes_scored: int | None = None,
) -> dict[str, Any]:
    """One trace's outcome (plain JSON, the stored row's search fields)."""
    return {
        "chosen_k": chosen_k,
        "fallback": fallback,
        "monotone": monotone,
        "full_score": full_score,
        "full_score_k": full_score_k,
        "threshold": threshold,
        "fitting_k": fitting_k,
        "probes": [
            {
                "k": p.k,
                "sufficient": p.sufficient,
                "score": p.score,
                "reply": p.reply,
                "over_context": fitting_k is not None and p.k > fitting_k,
            }
            for p in probes
        ],
        "prefixes_scored": prefixes_scored
        if prefixes_scored is not None
        else sum(fitting_k is None or p.k <= fitting_k for p in probes),
    }


def build_judge(judge: Judge, judge_prompt: JudgePrompt, cache_dir: str | Path, backend: Backend) -> SufficiencyJudge:
    """The sufficiency judge of the `truncation.judge` node on `backend` (an option of conf/backend/,
    resolved), its model loaded or its engine started here: called by the stage only when a trace
    needs judging, and by every Ray actor with the actor's own engine option.

    A model in this process (hf) is scored by palign's `HFScorer` (one forward per trace); any other
    back end is a `VerdictScorer` (palign/llm/backends.py) that scores each probed prefix as its own
    request, and generates in generate mode."""
    from palign.llm.backends import build_chat
    from palign.llm.hf_backend import LocalChatBackend
    from palign.llm.models import ModelSpec, context_length, load_tokenizer, resolve_model_path
    from palign.truncation.judge import HFScorer

    spec = ModelSpec.from_config(judge.model)
    # one context for every back end (the model's, or the knob), so all back ends judge the same probes
    context = judge.max_context_tokens or context_length(resolve_model_path(spec, cache_dir))
    shared = {
        "mode": judge.mode,
        "max_new_tokens": judge.max_new_tokens,
        "batch_size": judge.batch_size,
        "context_tokens": context,
    }
    tokenizer = load_tokenizer(spec, cache_dir)
    engine = build_chat(
        backend,
        "truncation.judge.backend",
        spec,
        cache_dir,
        tokenizer=tokenizer,
        stage="truncation (sufficiency judge)",
    )
    if isinstance(engine, LocalChatBackend):
        scorer = HFScorer(
            engine.model(),
            tokenizer,
            batch_size=judge.batch_size,
            max_tail_tokens=judge.max_tail_tokens,
            chat_template_kwargs=spec.chat_template_kwargs,
        )
        return SufficiencyJudge(
            scorer,
            tokenizer,
            judge_prompt,
            engine=judge.engine,
            chat_template_kwargs=spec.chat_template_kwargs,
            **shared,
        )
    engine_length = engine.context_length() if hasattr(engine, "context_length") else None
    if engine_length is not None and engine_length < context:
        raise ValueError(
            f"the judge's engine admits {engine_length} tokens (vllm.max_model_len, else the model's), "
            f"below the judge's context of {context} tokens (truncation.judge.max_context_tokens, else the "
            f"model's): it would refuse the longest probes; set truncation.judge.max_context_tokens="
            f"{engine_length} (or raise vllm.max_model_len)"
        )
    if judge.mode == "logits" and hasattr(engine, "check_logits_mode"):
        engine.check_logits_mode()
    # a served judge has no one-pass scorer: it scores each probed prefix as its own request (vLLM's
    # prefix cache shares the rest), never a trace's every prefix
    if judge.engine != "batched":
        log.info(
            "truncation: a judge on %r scores only the prefixes the search probes "
            "(truncation.judge.engine=%s applies in process)",
            backend,
            judge.engine,
        )
    return SufficiencyJudge.on_backend(engine, judge_prompt, engine=judge.engine, **shared)


def search_prefixes(
    search: SearchFactory,
    threshold: Threshold,
    judge: SufficiencyJudge,
    questions: Sequence[str],
    segs: Sequence[Segmentation],
    *,
    quantile_threshold: float | None = None,
    on_finished: Callable[[int], Any] | None = None,
) -> list[dict[str, Any]]:
    """Each trace's search outcome (chosen_k, probes, fallback, monotone, full_score, full_score_k,
    threshold, fitting_k, prefixes_scored; plain JSON): `search` with `judge`, all the traces advancing
    together in judge batches of the judge's `batch_size`. In logits mode `threshold` decides each
    verdict; a calibrated threshold's value is `quantile_threshold`, calibrated beforehand
    (`PrefixTruncation.run`).

    A probe longer than the judge's context (k > fitting_k) is not sent and counts as not sufficient
    (stored with `over_context: true`); a relative-to-full threshold is taken from the longest prefix
    that fits (`full_score_k`, the whole trace when it fits)."""
    memo: list[dict[int, float]] = [{} for _ in segs]  # logits-mode scores by prefix length
    full_scores: list[float | None] = [None] * len(segs)
    full_ks: list[int | None] = [None] * len(segs)
    thresholds: list[float | None] = [None] * len(segs)
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

    if judge.mode == "logits":
        # every reference prefix (e.g. the full trace, or its longest prefix that fits) in one judge call
        full_ks = [threshold.reference_k(s.m, fitting[i]) for i, s in enumerate(segs)]
        references = [(i, k) for i, k in enumerate(full_ks) if k is not None]
        if references:
            memoized_scores(references)
        full_scores = [memo[i][k] if k is not None else None for i, k in enumerate(full_ks)]
        thresholds = [threshold.threshold(score, quantile_threshold) for score in full_scores]
    states = [search(s.m) for s in segs]

    def judge_batch(requests: Sequence[tuple[int, int]]) -> list[Verdict]:
        verdicts: dict[tuple[int, int], Verdict] = {
            (i, k): Verdict(False, None, None) for i, k in requests if k > fitting[i]
        }  # over the context
        sent = [(i, k) for i, k in requests if k <= fitting[i]]
        if judge.mode == "generate":
            replies = judge.judge([(questions[i], segs[i].prefix(k)) for i, k in sent]) if sent else []
            verdicts.update(zip(sent, replies))
        else:
            memoized_scores(sent)
            verdicts.update(
                ((i, k), Verdict(memo[i][k] >= thresholds[i] - SCORE_TOLERANCE, memo[i][k], None)) for i, k in sent
            )
        return [verdicts[request] for request in requests]

    results = run_searches(states, judge_batch, judge.batch_size, on_finished=on_finished)
    return [
        _outcome(
            r.chosen_k,
            r.probes,
            fallback=r.fallback,
            monotone=r.monotone,
            full_score=full_scores[i],
            full_score_k=full_ks[i],
            threshold=thresholds[i],
            fitting_k=fitting[i],
            prefixes_scored=len(memo[i]) or None,
        )
        for i, r in enumerate(results)
    ]


def judged_probes(outcome: Mapping[str, Any]) -> int:
    """The probes of a search outcome (or stored row) that the judge was sent (none over its context)."""
    return sum(not probe.get("over_context", False) for probe in outcome["probes"])
