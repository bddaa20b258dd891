"""Stage 2, prefix alignment: the student continues each teacher prefix; only correct ones are kept.

PAPER.md §2.2 and Eq. 9: the student gets the authors' continuation prompt ("Please continue from
the draft ... *Question*:{question}\\n*Prefix*:{prefix}", `conf/prompts/paper.yaml`) and samples a
continuation (T=0.6, top-p 0.9, repetition penalty 1.05); the example is kept only when the
continuation's final answer is graded correct against the gold answer with math-verify (the paper
keeps ~97%). Without a prefix (the `student_only` ablation) the student answers the plain
instruction prompt and the same filter applies.

Continuations are stored in `<cache>/alignment/<fingerprint>/records.jsonl`, keyed by example id
and a hash of the question and prefix; the fingerprint covers the model, the prompt, the sampling
settings and the filter. Reruns and sweeps reuse them, an interrupted run resumes chunk by chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.artifacts.digests import fingerprint
from palign.artifacts.stores import open_stage_store, stage_folder
from palign.grading import GradingPool
from palign.llm.backends import Backend, ChatBackend, build_chat, complete_missing
from palign.llm.chat import instruction_prompt
from palign.llm.hf_backend import LocalChatBackend
from palign.llm.models import ModelSpec
from palign.teachers.records import TeacherRecord

log = logging.getLogger(__name__)

# Stored continuations and their grades depend on this code as well as on the settings: bump
# CODE_VERSION when a change here changes what is stored, so caches written by older code are never
# reused (tests/integration/test_stage_versions.py notices a change to the logic that did not bump it).
CODE_VERSION = 2  # 2: a Hugging Face reply ends at every eos id of the model's generation_config, as in vLLM

FILTERS = ("correct", "none")


def continuation_prompt(prompts: Mapping[str, Any], question: str, prefix: str) -> str:
    return prompts["continuation"].replace("{question}", question).replace("{prefix}", prefix)


@dataclass(kw_only=True)
class AlignmentSettings:
    """The `alignment` node's fields the stage reads (palign/schema.py: Alignment documents each and
    holds its default), gathered by `PrefixContinuation.from_config`."""

    model_identity: dict[str, Any]
    prompts: dict[str, Any]
    sampling: dict[str, Any]
    filter: str
    chunk_size: int
    grading_workers: int
    grading_timeout_s: float
    chat_template_kwargs: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        sampling = {k: v for k, v in self.sampling.items() if k != "batch_size"}
        return {
            "model": self.model_identity,
            "prompts": self.prompts,
            "sampling": sampling,
            "code_version": CODE_VERSION,
        }


class PrefixContinuation:
    """Callable stage: (records, prefixes or None) -> {record id: continuation} for kept examples."""

    def __init__(
        self,
        settings: AlignmentSettings,
        cache_dir: str | Path,
        model_loader: Callable[[], Any] | None,
        tokenizer,
        progress: bool = True,
        backend: ChatBackend | None = None,
    ):
        if settings.filter not in FILTERS:
            raise ValueError(f"alignment.filter must be one of {FILTERS}, got '{settings.filter}'")
        self.settings = settings
        self.model_loader = model_loader
        self.tokenizer = tokenizer
        self.progress = progress
        # e.g. VLLMChatBackend; by default the Hugging Face model from model_loader, loaded on first use
        self.backend = backend or LocalChatBackend(model_loader, tokenizer, settings.chat_template_kwargs)
        self.folder = stage_folder(Path(cache_dir) / "alignment", settings.identity())
        self.rows_seen: dict[str, dict[str, Any]] = {}
        self.generated = 0

    @classmethod
    def from_config(
        cls,
        model: Mapping[str, Any],
        filter: str,
        backend: Backend,
        sampling: Mapping[str, Any],
        chunk_size: int,
        grading: Mapping[str, Any],
        *,
        prompts: Mapping[str, Any],
        cache_dir: str | Path,
        tokenizer,
    ) -> PrefixContinuation:
        """The stage from the `alignment` config node (palign/schema.py: Alignment), on its `backend`
        option (conf/backend/). The model loads only when a record misses the store."""
        spec = ModelSpec.from_config(model)
        settings = AlignmentSettings(
            model_identity=spec.identity(),
            prompts=dict(prompts),
            sampling=dict(sampling),
            filter=filter,
            chunk_size=chunk_size,
            grading_workers=grading["workers"],
            grading_timeout_s=grading["timeout_s"],
            chat_template_kwargs=dict(spec.chat_template_kwargs),
        )
        engine = build_chat(
            backend, "alignment.backend", spec, cache_dir, tokenizer=tokenizer, stage="alignment (prefix continuation)"
        )
        return cls(settings, cache_dir, None, tokenizer, backend=engine)

    SUMMARY_KEY = "alignment"  # where a run's summary.json keeps `report`'s statistics

    def report(self, tracker) -> dict[str, Any]:
        """This stage's statistics (retention among them), logged to the run's tracker with a table of
        examples; returns them for the run's summary."""
        stats = dict(self.stats, artifact=str(self.folder))
        tracker.log_summary({f"alignment/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
        rows = list(self.rows_seen.values())[:8]
        tracker.log_table(
            "alignment/examples",
            ["id", "answer", "extracted", "correct", "continuation"],
            [[r["id"], r["answer"], r["extracted"], r["correct"], r["continuation"][:600]] for r in rows],
        )
        return stats

    def _user_text(self, record: TeacherRecord, prefix: str | None) -> str:
        if prefix is None:
            return instruction_prompt(self.settings.prompts, record.question)
        return continuation_prompt(self.settings.prompts, record.question, prefix)

    def __call__(self, records: Sequence[TeacherRecord], prefixes: Mapping[str, str] | None) -> dict[str, str]:
        rows = self.run(records, prefixes)
        keep_all = self.settings.filter == "none"
        return {row["id"]: row["continuation"] for row in rows if keep_all or row["correct"]}

    def run(self, records: Sequence[TeacherRecord], prefixes: Mapping[str, str] | None) -> list[dict[str, Any]]:
        usable = [r for r in records if prefixes is None or r.id in prefixes]
        by_key: dict[str, tuple[TeacherRecord, str | None]] = {}
        for record in usable:
            prefix = prefixes[record.id] if prefixes is not None else None
            by_key[f"{record.id}:{fingerprint(record.question, prefix, length=12)}"] = (record, prefix)
        items = [(key, self._user_text(record, prefix)) for key, (record, prefix) in by_key.items()]
        with (
            open_stage_store(self.folder, self.settings.identity(), key="key") as store,
            GradingPool(num_workers=self.settings.grading_workers, timeout_s=self.settings.grading_timeout_s) as pool,
        ):

            def grade_and_store(chunk) -> None:
                grades = pool.grade([(gens[0].text, by_key[key][0].answer) for key, gens in chunk], desc="grading")
                for (key, generations), grade in zip(chunk, grades):
                    record, prefix = by_key[key]
                    sample = generations[0]
                    store.add(
                        {
                            "key": key,
                            "id": record.id,
                            "question": record.question,
                            "answer": record.answer,
                            "prefix": prefix,
                            "continuation": sample.text,
                            "tokens": sample.num_tokens,
                            "finished": sample.finished,
                            "correct": bool(record.answer is not None and grade.correct),
                            "extracted": grade.extracted,
                            "grading_timed_out": grade.timed_out,
                        }
                    )

            progress = "prefix continuation" if self.progress else None
            self.generated += complete_missing(
                self.backend,
                items,
                store.__contains__,
                self.settings.sampling,
                grade_and_store,
                chunk_size=self.settings.chunk_size,
                progress=progress,
            )
            rows = [row for row in (store.get(key) for key in by_key) if row is not None]
            # a stored continuation depends on the question and prefix only, its grade also on the gold
            # answer: where the answer changed since (fixed, or now "no gold answer"), it is graded again
            # here rather than generated again, and the stored record is left as it was
            stale = [i for i, row in enumerate(rows) if row["answer"] != by_key[row["key"]][0].answer]
            if stale:
                log.info(
                    "alignment: %d stored continuations have another gold answer now; grading them again", len(stale)
                )
                answers = [by_key[rows[i]["key"]][0].answer for i in stale]
                grades = pool.grade(
                    [(rows[i]["continuation"], answer) for i, answer in zip(stale, answers)], desc="grading"
                )
                for i, answer, grade in zip(stale, answers, grades):
                    rows[i] = dict(
                        rows[i],
                        answer=answer,
                        correct=bool(answer is not None and grade.correct),
                        extracted=grade.extracted,
                        grading_timed_out=grade.timed_out,
                    )
        self.rows_seen.update((row["key"], row) for row in rows)
        return rows

    @property
    def stats(self) -> dict[str, Any]:
        rows = list(self.rows_seen.values())
        if not rows:
            return {"examples": 0}
        kept = sum(bool(r["correct"]) for r in rows)
        return {
            "examples": len(rows),
            "correct": kept,
            "retention": kept / len(rows),
            "finished_rate": sum(bool(r["finished"]) for r in rows) / len(rows),
            "continuation_tokens_mean": sum(r["tokens"] for r in rows) / len(rows),
            "generated_this_run": self.generated,
            "filter": self.settings.filter,
        }
