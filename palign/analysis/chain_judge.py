"""Chain-quality judge: which of two reasoning chains is the better supervision signal?

The paper's analysis uses "GLM-based evaluation" (PAPER.md §4, §8): an external LLM (GLM-4.5)
compares reasoning chains, supporting the claim that P-ALIGN's prefixes "provide more effective
supervision signals, while avoiding ... redundant and uncertain reasoning components". Its prompt
and numbers were not released; this module is our protocol for it.

For each problem the judge sees the question and two chains (e.g. the P-ALIGN target and the full
long CoT) and ends its reply with a verdict token for the first-shown chain, the second, or a tie
(`conf/chain_judge/*.yaml` holds the prompt and the tokens). LLM judges favour a position, so every
pair is judged twice, A shown first and B shown first, and the two verdicts are combined:

- each verdict becomes an outcome for chain A: win (+1), tie (0) or loss (-1); a reply without a
  verdict token is "unparseable", counted separately and scored as a tie;
- the pair's outcome is the sign of the sum: A wins if it wins both orders or wins one and ties
  the other; A loses symmetrically; a win in one order and a loss in the other (the judge followed
  the position, not the chain) is a tie, as are two ties.

The report gives A's win/tie/loss rates over pairs, the position-consistency rate (pairs whose two
parsed verdicts agree on A's outcome), how often a decisive verdict picked the first-shown chain
(0.5 = no position bias), the unparseable count, and one record per pair.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from palign.artifacts.digests import fingerprint
from palign.artifacts.stores import open_stage_store, stage_folder
from palign.llm.backends import Backend, ChatBackend, build_chat, complete_missing
from palign.llm.generation import SamplingConfig

log = logging.getLogger(__name__)

# Stored verdicts depend on this code as well as on the settings: bump CODE_VERSION when a change
# here changes what is stored, so caches written by older code are never reused
# (tests/integration/test_stage_versions.py notices a change to the logic that did not bump it).
CODE_VERSION = 2  # 2: a Hugging Face reply ends at every eos id of the model's generation_config, as in vLLM

WIN, TIE, LOSS = "win", "tie", "loss"
FIRST, SECOND = "first", "second"
ORDERS = ("a_first", "b_first")
_SCORE = {WIN: 1, TIE: 0, LOSS: -1}
_PLACEHOLDER = re.compile(r"\{(question|chain_1|chain_2)\}")


@dataclass(frozen=True)
class ChainPair:
    """Two supervision signals for the same problem."""

    id: str
    question: str
    chain_a: str
    chain_b: str


@dataclass(frozen=True)
class ChainJudgePrompt:
    """The judge prompt (`{question}`, `{chain_1}` shown first, `{chain_2}`) and its verdict tokens."""

    name: str
    prompt: str
    first: str
    second: str
    tie: str

    @classmethod
    def from_config(cls, cfg: Any) -> ChainJudgePrompt:
        """From a `conf/chain_judge/*.yaml` node (its `name`, `prompt` and `verdicts`)."""
        if isinstance(cfg, ChainJudgePrompt):
            return cfg
        name = cfg.get("name", "?")
        prompt, verdicts = cfg.get("prompt") or "", dict(cfg.get("verdicts") or {})
        for placeholder in ("{question}", "{chain_1}", "{chain_2}"):
            if placeholder not in prompt:
                raise ValueError(f"chain judge '{name}': `prompt` must contain {placeholder}")
        missing = {FIRST, SECOND, TIE} - set(verdicts)
        if missing:
            raise ValueError(
                f"chain judge '{name}': `verdicts` needs the keys {sorted(missing)} (the tokens the judge replies with)"
            )
        tokens = [verdicts[FIRST], verdicts[SECOND], verdicts[TIE]]
        if len({t.lower() for t in tokens}) < 3 or any(
            a.lower() in b.lower() for a in tokens for b in tokens if a != b
        ):
            raise ValueError(f"chain judge '{name}': verdict tokens {tokens} must be distinct and none inside another")
        absent = [t for t in tokens if t not in prompt]
        if absent:
            raise ValueError(
                f"chain judge '{name}': the prompt never tells the judge about the verdict tokens {absent}"
            )
        return cls(name=name, prompt=prompt, first=verdicts[FIRST], second=verdicts[SECOND], tie=verdicts[TIE])

    def render(self, question: str, chain_1: str, chain_2: str) -> str:
        # one pass, so braces or a placeholder inside a chain are never substituted again
        values = {"question": question, "chain_1": chain_1, "chain_2": chain_2}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.prompt)

    def parse(self, reply: str) -> str | None:
        """FIRST, SECOND or TIE from the last verdict token in the reply (case-insensitive), else None."""
        lowered = reply.lower()
        found = {
            verdict: lowered.rfind(token.lower())
            for verdict, token in ((FIRST, self.first), (SECOND, self.second), (TIE, self.tie))
        }
        verdict, position = max(found.items(), key=lambda item: item[1])
        return verdict if position >= 0 else None


def outcome_for_a(verdict: str | None, a_shown_first: bool) -> str | None:
    """A's outcome from a positional verdict; None stays None (unparseable)."""
    if verdict is None:
        return None
    if verdict == TIE:
        return TIE
    return WIN if (verdict == FIRST) == a_shown_first else LOSS


def combine_orders(a_first: str | None, b_first: str | None) -> str:
    """The pair's outcome for A from its two orders (see the module docstring): sign of the summed scores."""
    score = _SCORE[a_first or TIE] + _SCORE[b_first or TIE]
    return WIN if score > 0 else LOSS if score < 0 else TIE


@dataclass
class PairJudgment:
    id: str
    a_first: str | None  # A's outcome when A was shown first (None: unparseable)
    b_first: str | None  # A's outcome when B was shown first
    outcome: str  # combined outcome for A
    consistent: bool | None  # both orders parsed and agree on A's outcome; None if one is unparseable
    reply_a_first: str = ""
    reply_b_first: str = ""


def judge_pair(pair_id: str, reply_a_first: str, reply_b_first: str, prompt: ChainJudgePrompt) -> PairJudgment:
    """Parse the two replies for one pair and combine them (pure: no model involved)."""
    a_first = outcome_for_a(prompt.parse(reply_a_first), a_shown_first=True)
    b_first = outcome_for_a(prompt.parse(reply_b_first), a_shown_first=False)
    consistent = None if a_first is None or b_first is None else a_first == b_first
    return PairJudgment(
        pair_id, a_first, b_first, combine_orders(a_first, b_first), consistent, reply_a_first, reply_b_first
    )


def summarize(judgments: Sequence[PairJudgment]) -> dict[str, Any]:
    """Rates for A over pairs, position consistency and bias, unparseable verdicts."""
    n = len(judgments)
    counts = {k: sum(j.outcome == k for j in judgments) for k in (WIN, TIE, LOSS)}
    parsed_both = [j for j in judgments if j.consistent is not None]
    # a decisive verdict "picked the first-shown chain" when A won with A first or lost with B first
    decisive = [(o, order) for j in judgments for o, order in ((j.a_first, "a"), (j.b_first, "b")) if o in (WIN, LOSS)]
    picked_first = sum((o == WIN) == (order == "a") for o, order in decisive)
    rate = lambda k: counts[k] / n if n else None  # noqa: E731
    return {
        "pairs": n,
        "judgments": 2 * n,
        "a_wins": counts[WIN],
        "ties": counts[TIE],
        "a_losses": counts[LOSS],
        "a_win_rate": rate(WIN),
        "tie_rate": rate(TIE),
        "a_loss_rate": rate(LOSS),
        "unparseable": sum((j.a_first is None) + (j.b_first is None) for j in judgments),
        "position_consistency": sum(bool(j.consistent) for j in parsed_both) / len(parsed_both)
        if parsed_both
        else None,
        "first_position_preference": picked_first / len(decisive) if decisive else None,
    }


@dataclass
class ChainComparison:
    judgments: list[PairJudgment]
    summary: dict[str, Any]
    artifact: str | None = None
    records: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.records = [asdict(j) for j in self.judgments]


def compare_chains(
    backend: ChatBackend,
    pairs: Sequence[ChainPair],
    prompt: ChainJudgePrompt | Mapping[str, Any],
    sampling: SamplingConfig | Mapping[str, Any],
    cache_dir: str | Path | None = None,
    chunk_size: int = 64,
    progress: str | None = None,
) -> ChainComparison:
    """Judge every pair in both orders and combine the verdicts.

    With `cache_dir`, replies are stored in `<cache_dir>/chain_judge/<fingerprint>/records.jsonl`
    (back end, prompt and sampling in the fingerprint; each reply keyed by pair id, order and a
    hash of the texts), so a rerun or an interrupted run never pays for a judgment twice.
    """
    prompt = ChainJudgePrompt.from_config(prompt)
    sampling = SamplingConfig.from_config(sampling)
    if sampling.num_samples != 1:
        raise ValueError(
            f"chain judge: sampling.num_samples must be 1 (one verdict per order), got {sampling.num_samples}"
        )
    seen: set[str] = set()
    for pair in pairs:
        if pair.id in seen:
            raise ValueError(f"chain judge: duplicate pair id '{pair.id}'; ids must be unique")
        seen.add(pair.id)

    items: list[tuple[str, str]] = []
    keys: dict[tuple[str, str], str] = {}
    for pair in pairs:
        for order, (chain_1, chain_2) in zip(ORDERS, ((pair.chain_a, pair.chain_b), (pair.chain_b, pair.chain_a))):
            key = f"{pair.id}:{order}:{fingerprint(pair.question, chain_1, chain_2, length=12)}"
            keys[pair.id, order] = key
            items.append((key, prompt.render(pair.question, chain_1, chain_2)))

    replies: dict[str, str] = {}
    store, folder = None, None
    if cache_dir is not None:
        settings = {
            "judge": backend.identity(),
            "prompt": asdict(prompt),
            "sampling": {k: v for k, v in vars(sampling).items() if k != "batch_size"},
            "code_version": CODE_VERSION,
        }
        folder = stage_folder(Path(cache_dir) / "chain_judge", settings)
        store = open_stage_store(folder, settings, key="key")
        replies.update((row["key"], row["reply"]) for row in store.records())

    def keep(chunk) -> None:
        for key, generations in chunk:
            sample = generations[0]
            if store is not None:
                store.add({"key": key, "reply": sample.text, "tokens": sample.num_tokens, "finished": sample.finished})
            replies[key] = sample.text

    try:
        judged = complete_missing(backend, items, replies.__contains__, sampling, keep, chunk_size, progress)
    finally:
        if store is not None:
            store.close()
    log.info("chain judge: %d judgments (%d new) for %d pairs", len(items), judged, len(pairs))
    judgments = [
        judge_pair(p.id, replies[keys[p.id, "a_first"]], replies[keys[p.id, "b_first"]], prompt) for p in pairs
    ]
    return ChainComparison(judgments, summarize(judgments), artifact=str(folder) if folder else None)


def build_backend(backend: Backend, model: Any, cache_dir: str | Path) -> ChatBackend:
    """The judge on its `backend` option (conf/backend/: hf runs `model`; openai a server), with
    `model`'s tokenizer and template switches."""
    from palign.llm.models import ModelSpec, load_tokenizer

    spec = ModelSpec.from_config(model)
    return build_chat(
        backend, "chain_judge.backend", spec, cache_dir, tokenizer=load_tokenizer(spec, cache_dir), stage="chain judge"
    )


def judge_training_chains(
    *,
    records: Sequence[Any],
    baseline: str,
    truncation: Callable[[], Any],
    alignment: Callable[[], Any],
    markers: Mapping[str, str],
    cache_dir: str | Path,
    run_dir: str | Path,
    tracker: Any,
    **node: Any,
) -> tuple[str, str, dict[str, Any]]:
    """stage=judge_chains, the `_target_` of the `chain_judge` node (conf/chain_judge/, palign/schema.py:
    ChainJudge, whose fields are `node`): the judge compares targets `chain_a` and `chain_b` of the
    first `limit` training records in both orders. `truncation` and `alignment` build stages 1 and 2,
    called only when a compared target needs them. Writes one record per pair to
    `<run_dir>/chain_judge/`, logs the rates and a few examples to the tracker, and returns
    (comparison, judge label, statistics) for the run's summary."""
    from palign.artifacts.writes import write_jsonl_atomic
    from palign.data.supervision import CONTINUATION_TARGETS, PREFIX_TARGETS, build_targets

    compared = (node["chain_a"], node["chain_b"])
    if set(compared) >= {"prefix_continuation", "student_only"}:
        raise ValueError(
            "chain_judge: prefix_continuation and student_only need different continuations; compare each with long_cot"
        )
    records = list(records)[: node["limit"]] if node["limit"] is not None else list(records)
    prefixes = continuations = None
    if any(t in PREFIX_TARGETS for t in compared):
        stage = truncation()
        if stage is None:
            raise ValueError(
                f"chain_judge compares {compared}, but baseline '{baseline}' builds no prefixes; use baseline=palign"
            )
        prefixes = stage(records)
    if any(t in CONTINUATION_TARGETS for t in compared):
        stage = alignment()
        if stage is None:
            raise ValueError(
                f"chain_judge compares {compared}, but baseline '{baseline}' has no alignment stage; "
                "use baseline=palign"
            )
        continuations = stage(records, prefixes)
    texts = {
        t: {e.id: e.target for e in build_targets(records, t, prefixes, continuations, dict(markers))[0]}
        for t in compared
    }
    a, b = compared
    pairs = [
        ChainPair(r.id, r.question, texts[a][r.id], texts[b][r.id])
        for r in records
        if r.id in texts[a] and r.id in texts[b]
    ]
    engine = build_backend(node["backend"], node["model"], cache_dir)
    result = compare_chains(
        engine,
        pairs,
        ChainJudgePrompt.from_config(node),
        node["sampling"],
        cache_dir=cache_dir,
        chunk_size=node["chunk_size"],
        progress="chain judge",
    )
    comparison = f"{a}_vs_{b}"
    judge_label = str(
        engine.identity().get("model") or node["model"]["name"]
    )  # a server's model name, else the config's
    records_path = Path(run_dir) / "chain_judge" / f"{comparison}-{Path(result.artifact).name}.jsonl"
    write_jsonl_atomic(records_path, result.records)
    stats = dict(
        result.summary,
        problems=len(records),
        skipped=len(records) - len(pairs),
        records=str(records_path),
        artifact=result.artifact,
    )
    tracker.log_summary({f"chain_judge/{comparison}/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
    tracker.log_table(
        f"chain_judge/{comparison}/examples",
        ["id", "a_first", "b_first", "outcome", "reply_a_first", "reply_b_first"],
        [
            [r["id"], r["a_first"], r["b_first"], r["outcome"], r["reply_a_first"][-400:], r["reply_b_first"][-400:]]
            for r in result.records[:8]
        ],
    )
    return comparison, judge_label, stats
