"""Stage 1 over a data set: each trace's minimal sufficient prefix, cached and resumable.

`PrefixTruncation` splits every teacher trace into units (the `truncation.granularity` splitter,
`units.py`) and lets the baseline's prefix policy (`prefixes.py`) choose each prefix: the shortest
one the judge accepts (`search.py`, `judge.py`), or a fixed ratio of the units. It stores one
record per example: the units, every probe (k, verdict, score, raw reply), the chosen k, m, the
prefix ratio and token counts, and the fallback flag. It receives the schema's typed nodes
(palign/schema.py: Truncation, Judge, JudgePrompt) with their `_target_` parts built: the
splitter, the search factory, the threshold and the policy.

The store lives in `<cache>/truncation/<fingerprint>/`, keyed by everything that decides a prefix
(`prefixes.store_identity`: judge model, prompt, granularity, search, decision mode, threshold);
inside it each record is keyed by the example id and a hash of its question and trace. So a sweep
that reuses a truncation never recomputes it, a superset of examples only computes the new ones,
and an interrupted run resumes where it stopped (records are appended chunk by chunk; the judge is
not even loaded when nothing is missing).

Long traces. Every trace is searched, however long. A probe is sent to the judge only when its
prompt and reply fit the judge's context (`truncation.judge.max_context_tokens`, else the judge
model's own; palign/truncation/judge.py explains why); a longer probe counts as not sufficient,
is stored with `over_context: true` and counted (`probes_over_context`), and costs no judge call.
A trace whose every fitting probe is insufficient falls back to the full trace, as the authors'
loop does when nothing is sufficient, so no trace leaves the training set for its length alone
(the SFT length limit, `data.max_length`, is a separate, counted filter). The one-pass engine
scores the prefixes that fit only, so a pathological trace (a 200k-character one took 780 s with
the 2-layer test model when the whole trace was read) costs at most one context-long forward.
The context decides verdicts, so it is part of the store's fingerprint. Fixed-ratio truncation
reads no judge.

Progress: a bar over the traces to compute (on a terminal) and one log line per chunk with the
rate and the time left, so a long stage shows where it is in a log file too.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from palign.artifacts.digests import fingerprint
from palign.artifacts.readers import read_json
from palign.artifacts.stores import RecordStore, open_stage_store, stage_folder
from palign.artifacts.writes import write_json_atomic
from palign.schema import Judge, JudgePrompt
from palign.teachers.records import TeacherRecord
from palign.truncation.judge import QuantileThreshold, SufficiencyJudge
from palign.truncation.prefixes import (  # noqa: F401 (CODE_VERSION: the stage's version, recorded with it)
    CODE_VERSION,
    PrefixPolicy,
    SearchFactory,
    build_judge,
    judged_probes,
    store_identity,
)
from palign.truncation.ray_judge import RayJudgePool
from palign.truncation.units import Segmentation, Splitter

log = logging.getLogger(__name__)


def record_key(record: TeacherRecord) -> str:
    return f"{record.id}:{fingerprint(record.question, record.long_cot, length=12)}"


class PrefixTruncation:
    """Callable stage: records -> {record id: prefix}; `run` also returns the stored records."""

    def __init__(
        self,
        prefix: PrefixPolicy,
        granularity: Splitter,
        cache_dir: str | Path,
        tokenizer,
        *,
        chunk_size: int,
        search: SearchFactory | None = None,
        judge: Judge | None = None,
        judge_prompt: JudgePrompt | None = None,
        judge_factory: Callable[[], SufficiencyJudge] | None = None,
        judge_pool: RayJudgePool | None = None,
        progress: bool = True,
    ):
        """`prefix` chooses the prefixes of the units `granularity` cuts, with `search`, `judge` (the
        `truncation.judge` node) and `judge_prompt` where it reads them (palign/truncation/prefixes.py);
        `judge_factory` builds the judge on the first trace that needs one, or `judge_pool` judges in
        Ray actors. chunk_size: traces per stored chunk."""
        self.prefix = prefix
        self.granularity = granularity
        self.search = search
        self.judge_node = judge
        self.judge_prompt = judge_prompt
        self.chunk_size = chunk_size
        self.judge_pool = judge_pool  # set: the judging runs in Ray actors, not in this process
        self.tokenizer = tokenizer
        self.judge_factory = judge_factory
        self.progress = progress
        self.identity = store_identity(granularity, prefix, search, judge, judge_prompt)
        self.folder = stage_folder(
            Path(cache_dir) / "truncation", self.identity, f"{self.identity['search']}-{granularity.name}"
        )
        self._judge: SufficiencyJudge | None = None
        self.judge_calls = 0
        # record keys, so that running the same records again does not count them twice
        self.skipped: dict[str, set[str]] = {"no_units": set()}
        self.rows_seen: dict[str, dict[str, Any]] = {}  # every example this object truncated or read

    @classmethod
    def from_config(
        cls,
        *,
        granularity: Splitter,
        search: SearchFactory,
        judge: Judge,
        judge_prompt: JudgePrompt,
        chunk_size: int,
        prefix: PrefixPolicy,
        cache_dir: str | Path,
        tokenizer,
    ) -> PrefixTruncation | None:
        """The stage from the `truncation` node (conf/truncation/, palign/schema.py: Truncation), built by
        `instantiate` with the baseline's prefix policy (`baseline.prefix`); None when the policy reads
        no part of the node (no prefixes). A judge is built on `judge.backend` (an option of
        conf/backend/) only when the policy reads one and a record misses the store (never on a cache
        hit); a data-parallel option (ray) judges in workers of its own, each building one judge and
        searching whole chunks (palign/truncation/ray_judge.py)."""
        from functools import partial

        if not prefix.reads:
            return None
        parts = {"search": search, "judge": judge, "judge_prompt": judge_prompt, "chunk_size": chunk_size}
        if not prefix.judged:  # e.g. a fixed ratio: no judge to build
            return cls(prefix, granularity, cache_dir, tokenizer, **parts)
        backend = judge.backend.resolve("truncation.judge.backend")
        if backend.data_parallel:
            # no judge on the driver: each worker builds its own and searches whole chunks
            pool = RayJudgePool(judge, judge_prompt, cache_dir, backend, search)
            return cls(prefix, granularity, cache_dir, tokenizer, judge_pool=pool, **parts)
        return cls(
            prefix,
            granularity,
            cache_dir,
            tokenizer,
            judge_factory=partial(build_judge, judge, judge_prompt, cache_dir, backend),
            **parts,
        )

    SUMMARY_KEY = "truncation"  # where a run's summary.json keeps `report`'s statistics

    def report(self, tracker) -> dict[str, Any]:
        """This stage's statistics, logged to the run's tracker (W&B or CSV) with a histogram of
        prefix ratios and a table of examples; returns them for the run's summary."""
        rows = list(self.rows_seen.values())
        stats = dict(self.stats, judge_calls_this_run=self.judge_calls, artifact=str(self.folder))
        tracker.log_summary({f"truncation/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
        tracker.log_histogram("truncation/prefix_ratio", [row["prefix_ratio"] for row in rows])
        tracker.log_table(
            "truncation/examples",
            ["id", "m", "chosen_k", "prefix_ratio", "fallback", "kept", "dropped"],
            [
                [
                    r["id"],
                    r["m"],
                    r["chosen_k"],
                    round(r["prefix_ratio"], 3),
                    r["fallback"],
                    r["prefix"][-400:],
                    "".join(r["units"][r["chosen_k"] :])[:400],
                ]
                for r in rows[:8]
            ],
        )
        return stats

    # -- public -----------------------------------------------------------------------------------
    def __call__(self, records: Sequence[TeacherRecord]) -> dict[str, str]:
        return {row["id"]: row["prefix"] for row in self.run(records)}

    def run(self, records: Sequence[TeacherRecord]) -> list[dict[str, Any]]:
        with open_stage_store(self.folder, self.identity, key="key") as store:
            segmentations: dict[str, Segmentation] = {}
            todo: list[TeacherRecord] = []
            for record in records:
                if record_key(record) in store:
                    continue
                seg = self.granularity.split(record.long_cot, self.tokenizer)
                if seg.m == 0:
                    self.skipped["no_units"].add(record_key(record))
                    continue
                segmentations[record.id] = seg
                todo.append(record)
            if todo:
                log.info("truncation: %d of %d examples to compute in %s", len(todo), len(records), self.folder)
                rule = self._calibrated_threshold()
                if rule is not None:
                    self._calibrated_quantile(rule, todo, [segmentations[r.id] for r in todo])
            self._compute(todo, segmentations, store)
            rows = [store.get(record_key(r)) for r in records]
        kept = [row for row in rows if row is not None]
        self.rows_seen.update((row["key"], row) for row in kept)
        return kept

    @property
    def skipped_no_units(self) -> int:
        return len(self.skipped["no_units"])

    @property
    def stats(self) -> dict[str, Any]:
        return truncation_stats(list(self.rows_seen.values()), skipped=self.skipped_no_units)

    # -- internals --------------------------------------------------------------------------------
    def _compute(
        self, todo: Sequence[TeacherRecord], segmentations: Mapping[str, Segmentation], store: RecordStore
    ) -> None:
        """Truncate `todo` chunk by chunk into the store, showing progress over the traces; with a
        Ray judge pool the chunks are searched in its actors and stored as each one comes back."""
        if not todo:
            return
        started = time.perf_counter()
        chunks = [todo[start : start + self.chunk_size] for start in range(0, len(todo), self.chunk_size)]
        done = 0
        # tqdm's disable=None: a bar on a terminal only; the log lines below go everywhere
        with tqdm(total=len(todo), desc="truncation", unit="trace", disable=None if self.progress else True) as bar:
            quantile = self._quantile_threshold()  # read once for every chunk
            if self.judge_pool is None:
                finished = (
                    (chunk, self._truncate(chunk, [segmentations[r.id] for r in chunk], quantile, bar.update))
                    for chunk in chunks
                )
            else:
                finished = self._truncate_in_pool(chunks, segmentations, quantile, bar)
            for chunk, rows in finished:
                for row in rows:
                    store.add(row)
                done += len(chunk)
                elapsed = time.perf_counter() - started
                log.info(
                    "truncation: %d/%d traces (%.0f%%) in %.0f s, %.2f s/trace, about %.0f s left",
                    done,
                    len(todo),
                    100 * done / len(todo),
                    elapsed,
                    elapsed / done,
                    elapsed / done * (len(todo) - done),
                )

    def _truncate_in_pool(
        self,
        chunks: Sequence[Sequence[TeacherRecord]],
        segmentations: Mapping[str, Segmentation],
        quantile: float | None,
        bar,
    ):
        """(chunk, rows) for each chunk as the Ray actors finish it (in any order)."""
        work = [(chunk, [segmentations[r.id] for r in chunk]) for chunk in chunks]
        for position, outcomes in self.judge_pool.search(
            [([r.question for r in chunk], segs) for chunk, segs in work], quantile
        ):
            chunk, segs = work[position]
            bar.update(len(chunk))
            self.judge_calls += sum(judged_probes(outcome) for outcome in outcomes)
            yield chunk, self._rows(chunk, segs, outcomes)

    @property
    def judge(self) -> SufficiencyJudge:
        if self._judge is None:
            if self.judge_factory is None:
                raise RuntimeError("this truncation needs a judge but none was configured")
            self._judge = self.judge_factory()
        return self._judge

    def _calibrated_threshold(self) -> QuantileThreshold | None:
        """The judge's threshold when it is calibrated once per store (a logits-mode quantile), else None."""
        if not self.prefix.judged or self.judge_node.mode != "logits":
            return None
        return self.judge_node.threshold if self.judge_node.threshold.calibrates else None

    def _quantile_threshold(self) -> float | None:
        """The calibrated threshold's value (calibrated in `run`), else None."""
        if self._calibrated_threshold() is None:
            return None
        return float(read_json(self.folder / "calibration.json")["threshold"])

    def _calibrated_quantile(self, rule: QuantileThreshold, records, segs) -> float:
        """The rule's quantile of every prefix score of the first calibration examples (once per store)."""
        path = self.folder / "calibration.json"
        if path.exists():
            return float(read_json(path)["threshold"])
        n = min(rule.calibration_examples, len(records))
        items = [(r.question, s, range(1, s.m + 1)) for r, s in zip(records[:n], segs[:n])]
        scorer = self.judge_pool if self.judge_pool is not None else self.judge
        # the judge scores the prefixes that fit its context only (SufficiencyJudge.prefix_scores)
        scores = sorted(score for found in scorer.prefix_scores(items) for score in found.values())
        if not scores:
            raise ValueError(
                f"truncation: no prefix of the {n} calibration examples fits the judge's context, so the "
                "quantile threshold has nothing to calibrate on; raise truncation.judge.max_context_tokens "
                "or use another threshold kind"
            )
        threshold = rule.calibrate(scores)
        write_json_atomic(path, {"threshold": threshold, "quantile": rule.value, "examples": n, "scores": scores})
        log.info(
            "truncation: calibrated threshold %.3f (quantile %.2f of %d prefix scores)",
            threshold,
            rule.value,
            len(scores),
        )
        return threshold

    def _truncate(
        self,
        records: Sequence[TeacherRecord],
        segs: Sequence[Segmentation],
        quantile: float | None,
        on_finished: Callable[[int], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """The stored rows of `records`, their prefixes chosen by the policy in this process (`quantile`:
        a calibrated threshold's value)."""
        threshold = self.judge_node.threshold if self.prefix.judged else None
        outcomes = self.prefix.choose(
            segs,
            [r.question for r in records],
            search=self.search,
            threshold=threshold,
            judge=lambda: self.judge,
            quantile_threshold=quantile,
            on_finished=on_finished,
        )
        self.judge_calls += sum(judged_probes(outcome) for outcome in outcomes)
        return self._rows(records, segs, outcomes)

    def _rows(
        self, records: Sequence[TeacherRecord], segs: Sequence[Segmentation], outcomes: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """One stored row per record from its search's outcome (`search_prefixes`)."""
        rows = []
        for record, seg, outcome in zip(records, segs, outcomes, strict=True):
            k = outcome["chosen_k"]
            prefix = seg.prefix(k)
            rows.append(
                {
                    "key": record_key(record),
                    "id": record.id,
                    "question": record.question,
                    "answer": record.answer,
                    "granularity": seg.granularity,
                    "units": list(seg.units),
                    "m": seg.m,
                    "chosen_k": k,
                    "prefix_ratio": k / seg.m,
                    "prefix": prefix,
                    "prefix_tokens": self._count_tokens(prefix),
                    "full_tokens": self._count_tokens(seg.prefix(seg.m)),
                    "fallback": outcome["fallback"],
                    "monotone": outcome["monotone"],
                    "full_score": outcome["full_score"],
                    "full_score_k": outcome["full_score_k"],
                    "threshold": outcome["threshold"],
                    "probes": outcome["probes"],
                    "fitting_k": outcome["fitting_k"],
                    "probes_over_context": len(outcome["probes"]) - judged_probes(outcome),
                    "judge_calls": judged_probes(outcome) + (1 if outcome["full_score"] is not None else 0),
                    "prefixes_scored": outcome["prefixes_scored"],
                }
            )
        return rows

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def truncation_stats(rows: Sequence[Mapping[str, Any]], skipped: int = 0) -> dict[str, Any]:
    """Summary of a truncation artifact: ratios, fallbacks, judge cost, tokens saved, score spread,
    and the probes the judge's context kept from it.

    skipped: examples without units (they have no row, so they do not enter the ratios).
    """
    if not rows:
        return {"examples": 0, "skipped_no_units": skipped, "probes_over_context": 0, "examples_over_context": 0}
    ratios = [row["prefix_ratio"] for row in rows]
    scores = [p["score"] for row in rows for p in row["probes"] if p["score"] is not None]
    prefix_tokens = sum(row["prefix_tokens"] for row in rows)
    full_tokens = sum(row["full_tokens"] for row in rows)
    stats: dict[str, Any] = {
        "examples": len(rows),
        "skipped_no_units": skipped,
        "probes_over_context": sum(row.get("probes_over_context", 0) for row in rows),
        "examples_over_context": sum(bool(row.get("probes_over_context", 0)) for row in rows),
        "prefix_ratio_mean": statistics.fmean(ratios),
        "prefix_ratio_median": statistics.median(ratios),
        "fallback_rate": sum(bool(row["fallback"]) for row in rows) / len(rows),
        "judge_calls_per_example": statistics.fmean(row["judge_calls"] for row in rows),
        "prefixes_scored_per_example": statistics.fmean(row.get("prefixes_scored", row["judge_calls"]) for row in rows),
        "units_per_example": statistics.fmean(row["m"] for row in rows),
        "prefix_tokens_mean": prefix_tokens / len(rows),
        "tokens_saved_fraction": 1 - prefix_tokens / full_tokens if full_tokens else 0.0,
    }
    monotone = [row["monotone"] for row in rows if row["monotone"] is not None]
    if monotone:
        stats["monotone_rate"] = sum(monotone) / len(monotone)
    if scores:
        ordered = sorted(scores)
        stats.update(
            score_min=ordered[0],
            score_q25=ordered[len(ordered) // 4],
            score_median=statistics.median(ordered),
            score_q75=ordered[(3 * len(ordered)) // 4],
            score_max=ordered[-1],
        )
    return stats
