"""Teacher sources: where the long chains of thought come from (method step 1).

Every source yields the same `TeacherRecord` schema (id, question, answer, long_cot, short_cot,
source metadata), so truncation, alignment and SFT never care where a trace came from:
- `ChampTeacher`: the `champ-dataset` package (270 competition problems, human step solutions as
  short CoT, one named model's solution as the teacher trace); runs offline, the embedded default.
- `S1KTeacher`: `simplescaling/s1K-1.1`, the paper's training set (DeepSeek-R1 traces), from the
  hub or from a local file in the same schema.
- `JsonlTeacher`: any local JSON/JSONL file with configurable field names and marker stripping.
Records that cannot be used are skipped and counted per reason (`TeacherData.skipped`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from palign.evaluation.grading import answer_to_text, extract_boxed_answer
from palign.artifacts import DataFormatError, fingerprint, iter_records, require_field

log = logging.getLogger(__name__)


@dataclass
class TeacherRecord:
    id: str
    question: str
    answer: str | None
    long_cot: str
    short_cot: str | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TeacherData:
    records: list[TeacherRecord]
    skipped: Counter = field(default_factory=Counter)

    def fingerprint(self) -> str:
        return fingerprint([r.to_dict() for r in self.records])


def _answer_text(value: Any) -> str | None:
    """Gold answers as text (142.0 -> "142"), None when absent or empty."""
    if value is None:
        return None
    return answer_to_text(value) or None


def champ_problems(version: str = "v0") -> list[tuple[str, str, str | None]]:
    """(id, problem text, gold answer) of every CHAMP problem, in the package's order."""
    import champ_dataset

    return [(p.identifier, p.text, _answer_text(p.answer)) for p in champ_dataset.load(version).problems.values()]


class Teacher:
    """Base class: `load()` returns `TeacherData`; `limit` keeps the first N usable records."""

    name = "teacher"

    def __init__(self, limit: int | None = None, only_correct: bool = False):
        self.limit = limit
        self.only_correct = only_correct

    def _iter_records(self, skipped: Counter):
        raise NotImplementedError

    def load(self) -> TeacherData:
        skipped: Counter = Counter()
        records: list[TeacherRecord] = []
        seen: set[str] = set()
        for record in self._iter_records(skipped):
            if not record.question.strip():
                skipped["empty question"] += 1
                continue
            if not record.long_cot.strip():
                skipped["empty teacher trace"] += 1
                continue
            if record.id in seen:
                raise DataFormatError(f"{self.name}: duplicate record id '{record.id}'; ids must be unique")
            if self.only_correct:
                if record.answer is None:
                    skipped["no gold answer (only_correct)"] += 1
                    continue
                if not self._trace_is_correct(record):
                    skipped["teacher answer wrong (only_correct)"] += 1
                    continue
            seen.add(record.id)
            records.append(record)
            if self.limit is not None and len(records) >= self.limit:
                break
        if skipped:
            log.info("%s: kept %d records, skipped %s", self.name, len(records), dict(skipped))
        return TeacherData(records=records, skipped=skipped)

    def _trace_is_correct(self, record: TeacherRecord) -> bool:
        from palign.evaluation.grading import is_correct

        return is_correct(record.source.get("final_answer_text") or record.long_cot, record.answer)


class ChampTeacher(Teacher):
    """CHAMP (Mao et al. 2024): the named model's first-turn solution is the teacher trace.

    `model` is one of GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2 Medium; `setting` a CHAMP prompt setting
    such as `0-Shot`. CHAMP asks each model to summarise its answer in a second turn; that summary
    is what `only_correct` grades against the gold answer.
    """

    name = "champ"

    def __init__(self, model: str = "GPT-4", setting: str = "0-Shot", version: str = "v0", **kw):
        super().__init__(**kw)
        self.model, self.setting, self.version = model, setting, version

    def _iter_records(self, skipped: Counter):
        import champ_dataset

        dataset = champ_dataset.load(self.version)
        key = f"{self.model}|{self.setting}"
        for problem in dataset.problems.values():
            conversation = (problem.conversations or {}).get(key)
            if conversation is None:
                raise DataFormatError(
                    f"champ-dataset {self.version}: problem {problem.identifier} has no conversation '{key}'; "
                    "check teacher.model and teacher.setting"
                )
            replies = [m for m in conversation.messages if m.role.startswith("Model.")]
            if not replies or replies[0].text is None or replies[0].error is not None:
                skipped["teacher reply missing or cut at length"] += 1
                continue
            steps = [step.text for step in problem.solution.steps] if problem.solution else []
            yield TeacherRecord(
                id=problem.identifier,
                question=problem.text,
                answer=_answer_text(problem.answer),
                long_cot=replies[0].text.strip(),
                short_cot="\n".join(steps) if steps else None,
                source={
                    "dataset": f"champ-{self.version}",
                    "teacher": self.model,
                    "setting": self.setting,
                    "category": problem.category,
                    "final_answer_text": replies[-1].text if len(replies) > 1 else None,
                },
            )


class JsonlTeacher(Teacher):
    """Any local JSON/JSONL file. Field names accept dotted paths and list indices (`code.0`).

    `strip_markers` are literal strings removed from the trace (e.g. Sky-T1's
    `<|begin_of_thought|>`); `keep_between` optionally keeps only the text between two markers.
    """

    name = "jsonl"

    def __init__(
        self,
        path: str,
        question_field: str = "question",
        answer_field: str | None = "answer",
        long_cot_field: str = "long_cot",
        short_cot_field: str | None = None,
        id_field: str | None = None,
        strip_markers: Sequence[str] = (),
        keep_between: Sequence[str] | None = None,
        **kw,
    ):
        super().__init__(**kw)
        self.path = Path(path)
        self.question_field, self.answer_field = question_field, answer_field
        self.long_cot_field, self.short_cot_field = long_cot_field, short_cot_field
        self.id_field = id_field
        self.strip_markers = list(strip_markers)
        self.keep_between = list(keep_between) if keep_between else None

    def _clean(self, text: str) -> str:
        if self.keep_between:
            begin, end = self.keep_between
            if begin in text:
                text = text.split(begin, 1)[1]
            if end in text:
                text = text.split(end, 1)[0]
        for marker in self.strip_markers:
            text = text.replace(marker, "\n\n" if marker.strip() else marker)
        return re.sub(r"\n{3,}", "\n\n", text).strip()

    def _iter_records(self, skipped: Counter):
        for index, (where, row) in enumerate(iter_records(self.path)):
            trace = require_field(row, self.long_cot_field, where)
            if not isinstance(trace, str):
                raise DataFormatError(f"{where}: field '{self.long_cot_field}' must be a string, got {type(trace).__name__}")
            short = require_field(row, self.short_cot_field, where) if self.short_cot_field else None
            yield TeacherRecord(
                id=str(require_field(row, self.id_field, where)) if self.id_field else str(index),
                question=str(require_field(row, self.question_field, where)),
                answer=_answer_text(require_field(row, self.answer_field, where)) if self.answer_field else None,
                long_cot=self._clean(trace),
                short_cot=short.strip() if isinstance(short, str) and short.strip() else None,
                source={"dataset": str(self.path), "where": where},
            )


class S1KTeacher(Teacher):
    """s1K-1.1 (DeepSeek-R1 traces), the paper's training set; a hub id or a local file.

    The gold answer is the last `\\boxed{}` of the reference `solution`, or the whole solution
    when it is a short bare answer; `solution` also serves as the short CoT.
    """

    name = "s1k"

    def __init__(self, path: str = "simplescaling/s1K-1.1", split: str = "train", short_answer_chars: int = 64, **kw):
        super().__init__(**kw)
        self.path, self.split, self.short_answer_chars = path, split, short_answer_chars

    def _load_rows(self):
        import datasets

        local = Path(self.path)
        if local.exists():
            fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
            if fmt is None:
                raise DataFormatError(f"{local}: unsupported file type; use .jsonl, .json, .parquet or .csv")
            return datasets.load_dataset(fmt, data_files=str(local), split="train")
        return datasets.load_dataset(self.path, split=self.split)

    def _iter_records(self, skipped: Counter):
        for index, row in enumerate(self._load_rows()):
            where = f"{self.path}[{index}]"
            solution = str(require_field(row, "solution", where) or "")
            answer = extract_boxed_answer(solution)
            if answer is None and 0 < len(solution.strip()) <= self.short_answer_chars:
                answer = solution.strip()
            yield TeacherRecord(
                id=str(row.get("id", index)) if isinstance(row, dict) else str(index),
                question=str(require_field(row, "question", where)),
                answer=answer,
                long_cot=str(require_field(row, "deepseek_thinking_trajectory", where) or "").strip(),
                short_cot=solution.strip() or None,
                source={
                    "dataset": self.path,
                    "index": index,
                    "final_answer_text": str(row.get("deepseek_attempt") or "") or None,
                },
            )


class GeneratedTeacher(Teacher):
    """Teacher traces generated now by any model config (`teacher=generate`).

    Problems come from CHAMP (`problems.kind: champ`) or a local JSON/JSONL file (`kind: file`);
    the model answers the paper's instruction prompt with the shared batched generation code, and
    with `only_correct` (the default) only traces whose answer math-verify grades correct are kept.
    Generations are stored in `<cache>/teacher_generation/<fingerprint>/records.jsonl` (model,
    sampling, prompt and problem set in the fingerprint), appended chunk by chunk: reruns reuse
    them and an interrupted generation resumes.
    """

    name = "generate"

    def __init__(
        self,
        model: Any,
        problems: dict[str, Any],
        sampling: dict[str, Any],
        cache_dir: str,
        prompts: dict[str, Any],
        problem_limit: int | None = None,
        chunk_size: int = 32,
        grading_workers: int = 1,
        remote: dict[str, Any] | None = None,
        **kw,
    ):
        kw.setdefault("only_correct", True)
        super().__init__(**kw)
        from omegaconf import DictConfig, OmegaConf

        as_dict = lambda x: OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else dict(x)  # noqa: E731
        self.model_cfg = as_dict(model)
        self.problems_cfg = as_dict(problems)
        self.sampling = as_dict(sampling)
        self.prompts = as_dict(prompts)
        self.cache_dir = Path(cache_dir)
        self.problem_limit = problem_limit
        self.chunk_size = chunk_size
        self.grading_workers = grading_workers
        self.remote_cfg = as_dict(remote) if remote else None  # an OpenAI-compatible server instead of `model`

    def _problems(self) -> list[tuple[str, str, str | None]]:
        kind = self.problems_cfg.get("kind", "champ")
        if kind == "champ":
            rows = champ_problems(self.problems_cfg.get("version", "v0"))
        elif kind == "file":
            path = self.problems_cfg.get("path")
            if not path:
                raise ValueError("teacher=generate with problems.kind=file needs teacher.source.problems.path")
            rows = []
            for index, (where, row) in enumerate(iter_records(path)):
                id_field = self.problems_cfg.get("id_field")
                rows.append((
                    str(require_field(row, id_field, where)) if id_field else str(index),
                    str(require_field(row, self.problems_cfg.get("question_field", "problem"), where)),
                    _answer_text(require_field(row, self.problems_cfg.get("answer_field", "answer"), where)),
                ))
        else:
            raise ValueError(f"teacher.source.problems.kind must be champ or file, got '{kind}'")
        return rows[: self.problem_limit] if self.problem_limit is not None else rows

    def _iter_records(self, skipped: Counter):
        from functools import partial

        from palign.artifacts import RecordStore
        from palign.evaluation.grading import GradingPool
        from palign.llm.chat import instruction_prompt
        from palign.llm.generation import SamplingConfig
        from palign.llm.models import ModelSpec, load_model, load_tokenizer
        from palign.llm.openai_backend import LocalChatBackend, OpenAIChatBackend, complete_missing

        problems = self._problems()
        sampling = SamplingConfig.from_config(self.sampling)
        if self.remote_cfg:
            backend = OpenAIChatBackend.from_config(self.remote_cfg)
            model_identity, teacher_name = backend.identity(), backend.model
        else:
            spec = ModelSpec.from_config(self.model_cfg)
            backend = LocalChatBackend(partial(load_model, spec, self.cache_dir), load_tokenizer(spec, self.cache_dir),
                                       spec.chat_template_kwargs)
            model_identity, teacher_name = spec.identity(), spec.name
        identity = {"model": model_identity, "sampling": {k: v for k, v in vars(sampling).items() if k != "batch_size"},
                    "instruction": self.prompts["instruction"], "problems": self.problems_cfg}
        folder = self.cache_dir / "teacher_generation" / fingerprint(identity)
        by_id = {pid: (question, answer) for pid, question, answer in problems}
        with RecordStore(folder / "records.jsonl") as store, GradingPool(num_workers=self.grading_workers) as pool:

            def grade_and_store(chunk) -> None:
                grades = pool.grade([(gens[0].text, by_id[pid][1]) for pid, gens in chunk], desc="grading")
                for (pid, generations), grade in zip(chunk, grades):
                    question, answer = by_id[pid]
                    store.add({"id": pid, "question": question, "answer": answer, "trace": generations[0].text,
                               "finished": generations[0].finished, "correct": bool(answer is not None and grade.correct)})

            complete_missing(
                backend, [(pid, instruction_prompt(self.prompts, question)) for pid, question, _ in problems],
                store.__contains__, sampling, grade_and_store, chunk_size=self.chunk_size, progress="teacher generation",
            )
            rows = [store.get(pid) for pid, _, _ in problems]
        for row in rows:
            yield TeacherRecord(
                id=row["id"], question=row["question"], answer=row["answer"], long_cot=row["trace"],
                source={"dataset": "generated", "teacher": teacher_name, "correct": row["correct"], "finished": row["finished"]},
            )

    def _trace_is_correct(self, record: TeacherRecord) -> bool:
        return bool(record.source.get("correct"))  # graded once, when generated
