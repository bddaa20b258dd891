"""Teacher sources: where the long chains of thought come from (method stage 0).

Every source yields the same `TeacherRecord` schema (`palign.teachers.records`) (id, question, answer,
long_cot, short_cot, source metadata), so truncation, alignment and SFT never care where a trace came from:
- `ChampTeacher`: the `champ-dataset` package (270 competition problems, human step solutions as
  short CoT, one named model's solution as the teacher trace); runs offline, the embedded default.
- `S1KTeacher`: `simplescaling/s1K-1.1`, the paper's training set (DeepSeek-R1 traces), from the
  hub or from a local file in the same schema.
- `JsonlTeacher`: any local JSON/JSONL file with configurable field names and marker stripping.
Records that cannot be used are skipped and counted per reason (`TeacherData.skipped`).

Fields are never turned into text with `str()`: a null question would reach the prompt as "None"
and a list as its Python repr. What each field accepts (anything else is a `DataFormatError`
naming file, line and field):
- question and teacher trace: a string. An empty or blank one skips the record and is counted
  ("empty question", "empty teacher trace"); null, a number, a list or an object is an error.
- gold answer: optional. A string, or a number (`142.0` -> "142", see `answer_to_text`); null or
  an empty string means "no gold answer" (the record is kept with `answer=None`; `only_correct`
  skips and counts it). A boolean, a list or an object is an error. A gold answer nothing can be
  graded against (`palign.grading.gold_answer_problem`, the rule benchmarks and prediction files
  refuse by: a placeholder such as `N/A` or `see solution`, words such as `No integer solutions`,
  or what math-verify cannot read) is read as no gold answer too, named with file, line and field
  in a warning, and `only_correct` skips and counts it apart: graded against it, every trace would
  be wrong, and continuations (stage 2) would be too.
- id: a non-empty string or an integer (`7` -> "7"); null, a float, a boolean, a list or an object
  is an error, and so is an id that repeats (the message names both lines).
- short CoT: optional, a string or null.
A teacher file with no records at all (0 bytes, only blank lines, or `[]`) is an error too.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from palign.artifacts.errors import DataFormatError
from palign.artifacts.readers import iter_records, json_kind, record_id, require_field
from palign.artifacts.stores import open_stage_store, stage_folder
from palign.grading import answer_to_text, extract_boxed_answer, gold_answer_problem
from palign.teachers.records import TeacherData, TeacherRecord

log = logging.getLogger(__name__)

TEACHER_ID_FIX = "fix the record, or set the teacher's id field to null to number records by row"

# Stored teacher generations depend on this code as well as on the settings: bump CODE_VERSION when
# a change here changes what is stored, so caches written by older code are never reused
# (tests/integration/test_stage_versions.py notices a change to the logic that did not bump it).
CODE_VERSION = 3  # 2: a Hugging Face reply ends at every eos id of the model's generation_config, as in vLLM;
# 3: a gold answer nothing can be graded against is stored as none (and graded as no answer)


def _answer_text(value: Any) -> str | None:
    """Gold answers as text (142.0 -> "142"), None when absent or empty."""
    if value is None:
        return None
    return answer_to_text(value) or None


def _text_field(value: Any, field: str, where: str, what: str, setting: str | None = None) -> str:
    """A required text field as it is; anything but a string is refused, never stringified.

    `setting` is the config key that names the field, if the user chose it (told in the message).
    """
    if isinstance(value, str):
        return value
    fix = f"fix the record, or set {setting} to the field that holds {what}" if setting else "fix the record"
    raise DataFormatError(f"{where}: field '{field}' must be a string ({what}), got {json_kind(value)}; {fix}")


def _optional_text_field(value: Any, field: str, where: str, what: str, setting: str | None = None) -> str | None:
    return None if value is None else _text_field(value, field, where, what, setting)


def _answer_field(value: Any, field: str, where: str) -> str | None:
    """An optional gold answer: text or a number; null or "" is no answer."""
    try:
        return _answer_text(value)
    except TypeError as err:
        raise DataFormatError(
            f"{where}: field '{field}' is not a usable gold answer: {err}; "
            "store the answer as a string or a number, or null when there is none"
        ) from err


def _gradable_answer(answer: str | None, where: str, field: str, ungradable: list[str]) -> str | None:
    """`answer`, or None when nothing can be graded against it (noted in `ungradable`, named)."""
    problem = None if answer is None else gold_answer_problem(answer)
    if problem is None:
        return answer
    ungradable.append(f"{where}: field '{field}': {problem}")
    return None


def _warn_ungradable(source: str, ungradable: list[str]) -> None:
    if ungradable:
        shown = "; ".join(ungradable[:5]) + (f"; and {len(ungradable) - 5} more" if len(ungradable) > 5 else "")
        log.warning(
            "%s: %d gold answer%s cannot be graded against, so %s read as no gold answer (only_correct drops "
            "those records; fix the answers, or null them, to keep them): %s",
            source,
            len(ungradable),
            "s" * (len(ungradable) != 1),
            "they are" if len(ungradable) != 1 else "it is",
            shown,
        )


def _file_records(path: str | Path, setting: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """`iter_records(path)`, refusing a file without a single record: an empty or truncated copy
    would otherwise become an empty training set, noticed (if at all) stages later."""
    empty = True
    for where, row in iter_records(path):
        empty = False
        yield where, row
    if empty:
        what = "holds an empty JSON list" if Path(path).suffix == ".json" else "is empty (0 bytes or only blank lines)"
        raise DataFormatError(f"{path}: the file {what}, so there are no records; point {setting} at a file of records")


def champ_problems(version: str = "v0") -> list[tuple[str, str, str | None]]:
    """(id, problem text, gold answer) of every CHAMP problem, in the package's order."""
    import champ_dataset

    return [(p.identifier, p.text, _answer_text(p.answer)) for p in champ_dataset.load(version).problems.values()]


class Teacher:
    """Base class: `load()` returns `TeacherData`; `limit` keeps the first N usable records."""

    name = "teacher"
    id_hint = "make the record ids unique"
    """How to fix a repeated id: which field holds it and what to change."""
    answer_source = "answer"
    """The field the gold answer is read from, as messages name it."""

    def __init__(self, *, limit: int | None, only_correct: bool):
        """The fields of the source's schema node (palign/schema.py: TeacherSource and its
        subclasses document each and hold its default; `with_defaults` reads them)."""
        self.limit = limit
        self.only_correct = only_correct

    @classmethod
    def with_defaults(cls, **overrides: Any) -> Teacher:
        """This source at its schema node's defaults but `overrides` (tests, benchmarks)."""
        from dataclasses import is_dataclass

        from palign import schema

        target = f"{cls.__module__}.{cls.__qualname__}"
        (node,) = [
            n
            for n in vars(schema).values()
            if isinstance(n, type) and is_dataclass(n) and getattr(n, "_target_", None) == target
        ]
        return cls(**schema.defaults(node, **overrides))

    def _iter_records(self, skipped: Counter) -> Iterator[tuple[str, TeacherRecord]]:
        """Yield `(where, record)`; `where` ("file:line") is what error messages cite."""
        raise NotImplementedError

    def load(self) -> TeacherData:
        skipped: Counter = Counter()
        records: list[TeacherRecord] = []
        first_seen: dict[str, str] = {}  # id -> where; ids key every cached stage, so they must be unique
        ungradable: list[str] = []
        for where, record in self._iter_records(skipped):
            # every record's id counts, skipped or not: a repeat means the id field is not an id
            if record.id in first_seen:
                raise DataFormatError(
                    f"{where}: id '{record.id}' repeats {first_seen[record.id]}; ids must be unique ({self.id_hint})"
                )
            first_seen[record.id] = where
            if not record.question.strip():
                skipped["empty question"] += 1
                continue
            if not record.long_cot.strip():
                skipped["empty teacher trace"] += 1
                continue
            given = record.answer
            record.answer = _gradable_answer(given, where, self.answer_source, ungradable)
            if self.only_correct:
                if record.answer is None:
                    skipped[
                        "no gold answer (only_correct)"
                        if given is None
                        else "gold answer cannot be graded against (only_correct)"
                    ] += 1
                    continue
                if not self._trace_is_correct(record):
                    skipped["teacher answer wrong (only_correct)"] += 1
                    continue
            records.append(record)
            if self.limit is not None and len(records) >= self.limit:
                break
        _warn_ungradable(self.name, ungradable)
        if skipped:
            log.info("%s: kept %d records, skipped %s", self.name, len(records), dict(skipped))
        return TeacherData(records=records, skipped=skipped)

    def _trace_is_correct(self, record: TeacherRecord) -> bool:
        from palign.grading import is_correct

        return is_correct(record.source.get("final_answer_text") or record.long_cot, record.answer)


class ChampTeacher(Teacher):
    """CHAMP (Mao et al. 2024): the named model's first-turn solution is the teacher trace.

    `model` is one of GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2 Medium; `setting` a CHAMP prompt setting
    such as `0-Shot`. CHAMP asks each model to summarise its answer in a second turn; that summary
    is what `only_correct` grades against the gold answer.
    """

    name = "champ"

    def __init__(self, *, model: str, setting: str, version: str, **kw):
        super().__init__(**kw)
        self.model, self.setting, self.version = model, setting, version

    def _iter_records(self, skipped: Counter):
        import champ_dataset

        dataset = champ_dataset.load(self.version)
        key = f"{self.model}|{self.setting}"
        for problem in dataset.problems.values():
            where = f"champ-dataset {self.version}: problem {problem.identifier}"
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
            yield (
                where,
                TeacherRecord(
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
                ),
            )


class JsonlTeacher(Teacher):
    """Any local JSON/JSONL file. Field names accept dotted paths and list indices (`code.0`).

    `strip_markers` are literal strings removed from the trace (e.g. Sky-T1's
    `<|begin_of_thought|>`); `keep_between` optionally keeps only the text between two markers.
    """

    name = "jsonl"

    def __init__(
        self,
        *,
        path: str,
        question_field: str,
        answer_field: str | None,
        long_cot_field: str,
        short_cot_field: str | None,
        id_field: str | None,
        strip_markers: Sequence[str],
        keep_between: Sequence[str] | None,
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

    @property
    def id_hint(self) -> str:
        return (
            f"field '{self.id_field}': set teacher.source.id_field to a field that is unique, "
            "or to null to number records by row"
        )

    @property
    def answer_source(self) -> str:
        return self.answer_field or "answer"

    def _iter_records(self, skipped: Counter):
        for index, (where, row) in enumerate(_file_records(self.path, "teacher.source.path")):
            get = lambda name: require_field(row, name, where)  # noqa: E731, B023 (used within this row's iteration)
            trace = _text_field(
                get(self.long_cot_field),
                self.long_cot_field,
                where,
                "the teacher's long CoT",
                "teacher.source.long_cot_field",
            )
            short = (
                _optional_text_field(
                    get(self.short_cot_field),
                    self.short_cot_field,
                    where,
                    "the short CoT",
                    "teacher.source.short_cot_field",
                )
                if self.short_cot_field
                else None
            )
            yield (
                where,
                TeacherRecord(
                    id=record_id(get(self.id_field), self.id_field, where, TEACHER_ID_FIX)
                    if self.id_field
                    else str(index),
                    question=_text_field(
                        get(self.question_field),
                        self.question_field,
                        where,
                        "the problem text",
                        "teacher.source.question_field",
                    ),
                    answer=_answer_field(get(self.answer_field), self.answer_field, where)
                    if self.answer_field
                    else None,
                    long_cot=self._clean(trace),
                    short_cot=short.strip() if short and short.strip() else None,
                    source={"dataset": str(self.path), "where": where},
                ),
            )


class S1KTeacher(Teacher):
    """s1K-1.1 (DeepSeek-R1 traces), the paper's training set; a hub id or a local file.

    The gold answer is the last `\\boxed{}` of the reference `solution`, or the whole solution
    when it is a short bare answer; `solution` also serves as the short CoT.
    """

    name = "s1k"
    id_hint = "field 'id': make the ids unique, or drop the field to number records by row"
    answer_source = "solution"  # its last \\boxed{}, or the whole of a short one

    def __init__(self, *, path: str, split: str, short_answer_chars: int, **kw):
        super().__init__(**kw)
        self.path, self.split, self.short_answer_chars = path, split, short_answer_chars

    def _rows(self) -> Iterator[tuple[str, Any]]:
        """`(where, row)`: JSON/JSONL through the strict reader (file:line in errors), the rest via `datasets`."""
        local = Path(self.path)
        if local.exists():
            if local.suffix in (".jsonl", ".json"):
                yield from _file_records(local, "teacher.source.path")
                return
            if local.suffix not in (".parquet", ".csv"):
                raise DataFormatError(f"{local}: unsupported file type; use .jsonl, .json, .parquet or .csv")
            import datasets

            rows = datasets.load_dataset(local.suffix[1:], data_files=str(local), split="train")
        else:
            import datasets

            rows = datasets.load_dataset(self.path, split=self.split)
        for index, row in enumerate(rows):
            yield f"{self.path}[{index}]", row

    def _iter_records(self, skipped: Counter):
        for index, (where, row) in enumerate(self._rows()):
            solution = require_field(row, "solution", where)
            # the reference solution, or a bare answer that a CSV/parquet reader may have typed as a number
            if isinstance(solution, (int, float)):
                solution = _answer_field(solution, "solution", where) or ""
            else:
                solution = _optional_text_field(solution, "solution", where, "the reference solution") or ""
            answer = extract_boxed_answer(solution)
            if answer is None and 0 < len(solution.strip()) <= self.short_answer_chars:
                answer = solution.strip()
            attempt = _optional_text_field(
                row.get("deepseek_attempt"), "deepseek_attempt", where, "the teacher's final answer"
            )
            trajectory = require_field(row, "deepseek_thinking_trajectory", where)
            yield (
                where,
                TeacherRecord(
                    id=record_id(row["id"], "id", where, TEACHER_ID_FIX) if "id" in row else str(index),
                    question=_text_field(require_field(row, "question", where), "question", where, "the problem text"),
                    answer=answer,
                    long_cot=_text_field(
                        trajectory, "deepseek_thinking_trajectory", where, "the teacher's long CoT"
                    ).strip(),
                    short_cot=solution.strip() or None,
                    source={
                        "dataset": self.path,
                        "index": index,
                        "final_answer_text": attempt or None,
                    },
                ),
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
        *,
        model: Any,
        problems: dict[str, Any],
        sampling: dict[str, Any],
        cache_dir: str,
        prompts: dict[str, Any],
        problem_limit: int | None,
        chunk_size: int,
        grading_workers: int,
        remote: dict[str, Any] | None,
        backend: Any,
        **kw,
    ):
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
        self.backend = backend  # how `model` generates: an option of conf/backend/; not with `remote`

    def _problems(self) -> list[tuple[str, str, str | None]]:
        """(id, problem text, gold answer) of each problem to generate for; a gold answer nothing can be
        graded against is none (warned), before any trace is graded and stored against it."""
        kind = self.problems_cfg.get("kind", "champ")
        if kind == "champ":
            version = self.problems_cfg.get("version", "v0")
            answer_field = "answer"
            rows = [
                (f"champ-dataset {version}: problem {pid}", pid, question, answer)
                for pid, question, answer in champ_problems(version)
            ]
        elif kind == "file":
            path = self.problems_cfg.get("path")
            if not path:
                raise ValueError("teacher=generate with problems.kind=file needs teacher.source.problems.path")
            id_field = self.problems_cfg.get("id_field")
            question_field = self.problems_cfg.get("question_field", "problem")
            answer_field = self.problems_cfg.get("answer_field", "answer")
            rows, first_seen = [], {}
            for index, (where, row) in enumerate(_file_records(path, "teacher.source.problems.path")):
                problem_id = (
                    record_id(require_field(row, id_field, where), id_field, where, TEACHER_ID_FIX)
                    if id_field
                    else str(index)
                )
                if problem_id in first_seen:  # generations are stored by problem id
                    raise DataFormatError(
                        f"{where}: id '{problem_id}' repeats {first_seen[problem_id]}; ids must be unique: set "
                        f"teacher.source.problems.id_field (now '{id_field}') to a unique field, "
                        "or to null to number problems by row"
                    )
                first_seen[problem_id] = where
                rows.append(
                    (
                        where,
                        problem_id,
                        _text_field(
                            require_field(row, question_field, where),
                            question_field,
                            where,
                            "the problem text",
                            "teacher.source.problems.question_field",
                        ),
                        _answer_field(require_field(row, answer_field, where), answer_field, where),
                    )
                )
        else:
            raise ValueError(f"teacher.source.problems.kind must be champ or file, got '{kind}'")
        rows = rows[: self.problem_limit] if self.problem_limit is not None else rows
        ungradable: list[str] = []
        problems = [
            (pid, question, _gradable_answer(answer, where, answer_field, ungradable))
            for where, pid, question, answer in rows
        ]
        _warn_ungradable(f"{self.name} ({kind} problems)", ungradable)
        return problems

    def _iter_records(self, skipped: Counter):
        from palign.grading import GradingPool
        from palign.llm.backends import complete_missing
        from palign.llm.chat import instruction_prompt
        from palign.llm.generation import SamplingConfig
        from palign.llm.models import ModelSpec
        from palign.llm.openai_backend import OpenAIChatBackend

        problems = self._problems()
        sampling = SamplingConfig.from_config(self.sampling)
        if self.remote_cfg:
            backend = OpenAIChatBackend.from_config(self.remote_cfg)
            model_identity, teacher_name = backend.identity(), backend.model
        else:
            spec = ModelSpec.from_config(self.model_cfg)
            backend = self._model_backend(spec)
            model_identity, teacher_name = spec.identity(), spec.name
        identity = {
            "model": model_identity,
            "sampling": {k: v for k, v in vars(sampling).items() if k != "batch_size"},
            "instruction": self.prompts["instruction"],
            "problems": self.problems_cfg,
            "code_version": CODE_VERSION,
        }
        folder = stage_folder(self.cache_dir / "teacher_generation", identity)
        by_id = {pid: (question, answer) for pid, question, answer in problems}
        with open_stage_store(folder, identity) as store, GradingPool(num_workers=self.grading_workers) as pool:

            def grade_and_store(chunk) -> None:
                grades = pool.grade([(gens[0].text, by_id[pid][1]) for pid, gens in chunk], desc="grading")
                for (pid, generations), grade in zip(chunk, grades):
                    question, answer = by_id[pid]
                    store.add(
                        {
                            "id": pid,
                            "question": question,
                            "answer": answer,
                            "trace": generations[0].text,
                            "finished": generations[0].finished,
                            "correct": bool(answer is not None and grade.correct),
                        }
                    )

            complete_missing(
                backend,
                [(pid, instruction_prompt(self.prompts, question)) for pid, question, _ in problems],
                store.__contains__,
                sampling,
                grade_and_store,
                chunk_size=self.chunk_size,
                progress="teacher generation",
            )
            rows = [store.get(pid) for pid, _, _ in problems]
        for row in rows:  # problem ids were checked unique above; the store is where the trace lives
            yield (
                f"{store.path}: problem {row['id']}",
                TeacherRecord(
                    id=row["id"],
                    question=row["question"],
                    answer=row["answer"],
                    long_cot=row["trace"],
                    source={
                        "dataset": "generated",
                        "teacher": teacher_name,
                        "correct": row["correct"],
                        "finished": row["finished"],
                    },
                ),
            )

    def _model_backend(self, spec):
        """`model` on its `backend` option (nothing loads or starts until a problem misses the store)."""
        from palign.llm.backends import build_chat
        from palign.llm.models import load_tokenizer

        return build_chat(
            self.backend,
            "teacher.source.backend",
            spec,
            self.cache_dir,
            tokenizer=load_tokenizer(spec, self.cache_dir),
            stage="teacher generation",
        )

    def _trace_is_correct(self, record: TeacherRecord) -> bool:
        return bool(record.source.get("correct"))  # graded once, when generated
