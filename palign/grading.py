"""Answer grading, shared by teachers, alignment and evaluation (paper §3 "Grading", §7.4; differences in §9.17).

The authors grade a sampled solution with `math_verify`: the gold answer is wrapped as
`"$" + gold + "$"` and parsed, the model output is parsed with math-verify's default extraction
(which prefers the last `\\boxed{}`), and `verify(gold, pred)` decides. They guard each item with a
10 s `SIGALRM`. We do the same, but a signal cannot interrupt sympy stuck inside C code and cannot
be used off the main thread, so `GradingPool` grades in worker processes and enforces the limit
from the outside: a worker that overruns is killed and replaced, its item is graded wrong and
counted as a timeout, and the run carries on. (The authors also accept a sample when the OAT
grader says so; that grader is not a dependency here, see PAPER.md §9.4.)

`extract_boxed_answer` is a diagnostic helper (what did the model box?); the verdict always comes
from math-verify's own extraction, exactly as in the authors' evaluation.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import pickle
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from math_verify import parse, verify
from tqdm.auto import tqdm

from palign.artifacts.errors import DataFormatError

GradeFn = Callable[[str, Any], tuple[bool, str | None]]
"""Grades one `(output, gold)` pair: returns `(correct, extracted answer or None)`; may raise."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed x` in `text`, or None.

    Nested braces are matched (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`) and escaped braces `\\{`,
    `\\}` do not count. If the last box is never closed (an output cut off at the length cap),
    the answer is None: an earlier box is not the model's final answer.
    """
    start = -1
    command = ""
    for candidate in _BOX_COMMANDS:
        pos = text.rfind(candidate)
        if pos > start:
            start, command = pos, candidate
    if start < 0:
        return None
    i = start + len(command)
    if i < len(text) and text[i] == "{":
        depth = 0
        j = i
        while j < len(text):
            char = text[j]
            if char == "\\":
                j += 2
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None
    if i < len(text) and text[i].isspace():
        # `\boxed 5$`: the argument is the next whitespace- or `$`-delimited token.
        rest = text[i:].lstrip()
        end = 0
        while end < len(rest) and not rest[end].isspace() and rest[end] != "$":
            end += 1
        return rest[:end] or None
    return None


def answer_to_text(answer: Any) -> str:
    """A gold answer as text: `70` -> "70", `142.0` -> "142", `0.25` -> "0.25", `" 5 "` -> "5".

    Benchmark files store answers as str, int or float (AMC12 has `142.0`); math-verify must see
    the integer spelling, or `$142.0$` would be compared as a float.
    """
    if isinstance(answer, bool):
        raise TypeError(f"a gold answer cannot be a bool (got {answer!r})")
    if isinstance(answer, int):
        return str(answer)
    if isinstance(answer, float):
        if answer.is_integer():
            return str(int(answer))
        return repr(answer)
    if isinstance(answer, str):
        return answer.strip()
    raise TypeError(f"a gold answer must be str, int or float, got {type(answer).__name__}: {answer!r}")


def _signal_timeout() -> int | None:
    # math-verify's timeouts use `signal.alarm`, which only a process's main thread may set
    return 5 if threading.current_thread() is threading.main_thread() else None


def parse_gold(gold: Any) -> list:
    """The gold answer as the grader sees it: math-verify's `parse("$" + gold + "$")`."""
    return parse("$" + answer_to_text(gold) + "$", parsing_timeout=_signal_timeout())


# What stands where an answer should be. The missing-value spellings are pandas' (pandas/_libs/
# parsers.pyx: STR_NA_VALUES, which read_csv reads as missing), the rest are what data sets put in
# place of an answer (`see solution`, `TBD`, `abc`). math-verify reads each as a product of symbols
# (`N/A` is n/a), so without this check it would grade every sample against it, wrong, silently.
# Compared lowercased, without dots, quotes or brackets, \text{} and the like unwrapped.
PLACEHOLDER_ANSWERS = frozenset(
    {
        "#n/a",
        "#n/a n/a",
        "#na",
        "-1#ind",
        "-1#qnan",
        "-nan",
        "1#ind",
        "1#qnan",
        "<na>",
        "n/a",
        "na",
        "null",
        "nan",
        "none",
        "nil",
        "tbd",
        "tba",
        "tbc",
        "todo",
        "fixme",
        "xxx",
        "abc",
        "unknown",
        "missing",
        "placeholder",
        "answer",
        "no answer",
        "not available",
        "not applicable",
        "omitted",
        "proof",
        "?",
        "??",
        "???",
        "-",
        "--",
    }
)
_PLACEHOLDER_PREFIXES = ("see ", "refer to ", "cf ")  # `see solution`, `see the solution above`, `refer to the text`
# LaTeX that holds text, not mathematics
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|texttt|textnormal|mathrm|mbox|emph)\s*\{([^{}]*)\}")


def placeholder_problem(text: str) -> str | None:
    """Why the gold answer `text` is a placeholder or words rather than mathematics, or None.

    - a placeholder: `N/A`, `TBD`, `none`, `?`, `see solution`, also inside `\\text{}` (`PLACEHOLDER_ANSWERS`);
    - words, not mathematics: two or more bare words, one of them longer than a letter, and nothing
      else (no number, no operator, no LaTeX): `no integer solutions`, `the limit does not exist`.
      Words written as text, `\\text{two lines}`, are a worded answer and kept, and so are letters
      (`C`, `(C)`, `LQSX`, `x y`) and a single word (`yes`, `east`): math-verify compares those as
      what they spell.
    """
    plain = text
    while (unwrapped := _TEXT_COMMAND.sub(r"\1", plain)) != plain:
        plain = unwrapped
    plain = " ".join(plain.replace("$", " ").lower().split())
    key = " ".join(re.sub(r"[.'\"`()\[\]{}]", "", plain).split())
    if key in PLACEHOLDER_ANSWERS or plain.strip(".()[] ").startswith(_PLACEHOLDER_PREFIXES):
        return f"the gold answer '{text}' is a placeholder, not an answer"
    words = _TEXT_COMMAND.sub(" ", text).split()
    if len(words) > 1 and all(word.isalpha() for word in words) and any(len(word) > 1 for word in words):
        return (
            f"the gold answer '{text}' is words, not mathematics (no number, no operator; write a worded "
            "answer as \\text{...})"
        )
    return None


def gold_answer_problem(gold: Any) -> str | None:
    """Why no sample could be graded against `gold`, or None when it is gradable: the one rule for
    gold answers, in benchmarks, prediction files and teacher files.

    A gold answer is gradable when it is mathematics that math-verify reads. It is not when it is a
    placeholder or words (`placeholder_problem`: math-verify would read `see solution` as a product
    of letters), or when math-verify cannot read it (an empty string, a truncated `\\frac{11}{`):
    `parse` then returns nothing or only the raw text. Either way `verify` grades every sample wrong
    without any error: a silently lower pass@1.
    """
    try:
        text = answer_to_text(gold)
    except TypeError as err:
        return str(err)
    if not text:
        return "the gold answer is empty"
    problem = placeholder_problem(text)
    if problem is not None:
        return problem
    try:
        parsed = parse_gold(text)
    except Exception as err:  # noqa: BLE001 (math-verify's own timeout, or a parser crash)
        return f"math-verify failed to parse it ({type(err).__name__}: {err})"
    if not any(not isinstance(item, str) for item in parsed):
        return f"math-verify cannot read the gold answer '{text}' as a math expression"
    return None


def check_gold_answer(answer: str, where: str, field: str) -> None:
    """Raise unless math-verify can grade against `answer` (see `gold_answer_problem`).

    Shared by benchmark files and `stage=grade` prediction files: both refuse such a problem
    rather than skip it, so a pass@1 is always over every problem of the file.
    """
    problem = gold_answer_problem(answer)
    if problem is not None:
        raise DataFormatError(
            f"{where}: field '{field}': {problem}, so every sample of this problem would be graded wrong; "
            "fix the gold answer (a complete LaTeX or plain expression such as \\frac{11}{3}) or remove the problem"
        )


def math_verify_grade(output: str, gold: Any) -> tuple[bool, str | None]:
    """The authors' grader: `verify(parse("$gold$"), parse(output))`; returns (correct, extracted).

    math-verify's own per-call timeouts (5 s, `signal.alarm`) stay on where signals work, i.e. on
    a process's main thread (always the case in `GradingPool` workers). Off the main thread they
    are switched off, because math-verify would otherwise refuse to run; there the only guard is
    the pool's hard timeout.
    """
    signal_timeout = _signal_timeout()
    gold_parsed = parse_gold(gold)
    pred = parse(output, parsing_timeout=signal_timeout)
    extracted = str(pred[1]) if len(pred) > 1 else None
    correct = verify(gold_parsed, pred, timeout_seconds=signal_timeout)
    return bool(correct), extracted


def is_correct(output: str, gold: Any) -> bool:
    """Whether `output` answers `gold` under math-verify; any failure counts as wrong."""
    try:
        return math_verify_grade(output, gold)[0]
    except Exception:  # noqa: BLE001 (any failure counts as wrong)
        return False


@dataclass(frozen=True)
class GradeResult:
    """The grade of one sample. `timed_out` and `error` explain a wrong grade that is not a verdict."""

    correct: bool
    extracted: str | None = None
    timed_out: bool = False
    error: str | None = None


def _grade_safely(grade_fn: GradeFn, output: str, gold: Any) -> GradeResult:
    try:
        correct, extracted = grade_fn(output, gold)
    except Exception as err:  # noqa: BLE001 (graded wrong, the error kept with the grade)
        return GradeResult(correct=False, error=f"{type(err).__name__}: {err}")
    return GradeResult(correct=bool(correct), extracted=None if extracted is None else str(extracted))


_READY = "ready"


def _worker_main(conn: multiprocessing.connection.Connection, grade_fn: GradeFn) -> None:
    """Worker loop: answer each `(index, output, gold)` with `(index, GradeResult)` until EOF/None."""
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, output, gold = task
        conn.send((index, _grade_safely(grade_fn, output, gold)))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, grade_fn: GradeFn):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, grade_fn), daemon=True)
        self.process.start()
        child_conn.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (item index, deadline)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(None)
        self.process.join(timeout=5)
        self.kill()


class GradingPool:
    """Grades `(output, gold)` pairs in worker processes with a hard per-item timeout.

    Use as a context manager: `with GradingPool(num_workers=2) as pool: pool.grade(pairs)`.
    Workers start on first use, are reused across `grade` calls and stop on exit.

    Args:
        num_workers: worker processes; 0 grades serially in this process, for debugging: no hard
            timeout then, only math-verify's own 5 s signal timeouts (on the main thread).
        timeout_s: wall-clock limit per item, from the moment the item is handed to a worker. A
            worker that overruns is killed and replaced; the item is wrong and `timed_out`.
        grade_fn: the grading function; must be a module-level function (workers are spawned and
            receive it by pickling). Tests inject one that hangs.
        start_method: "spawn" (default) or "forkserver"; never "fork", which is unsafe once torch
            or CUDA threads exist in the parent.
        progress: show a tqdm bar.
        startup_timeout_s: how long a new worker may take to import its modules.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        grade_fn: GradeFn = math_verify_grade,
        start_method: str = "spawn",
        progress: bool = False,
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        if num_workers > 0:
            try:
                pickle.dumps(grade_fn)
            except Exception as err:
                raise TypeError(
                    f"grade_fn {grade_fn!r} cannot be sent to worker processes ({err}); "
                    "pass a module-level function, not a lambda or a closure"
                ) from err
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.grade_fn = grade_fn
        self.progress = progress
        self.startup_timeout_s = startup_timeout_s
        self._ctx = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self.num_timeouts = 0
        """Items killed for overrunning `timeout_s`, over the pool's lifetime."""

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop all workers (a busy one is killed)."""
        for worker in self._workers:
            if worker.task is None:
                worker.stop()
            else:
                worker.kill()
        self._workers = []

    def grade(self, pairs: Iterable[tuple[str, Any]], desc: str = "grading") -> list[GradeResult]:
        """Grade every `(output, gold)` pair; results come back in input order."""
        items = list(pairs)
        if not items:
            return []
        with tqdm(total=len(items), desc=desc, disable=not self.progress) as bar:
            if self.num_workers == 0:
                results = []
                for output, gold in items:
                    results.append(_grade_safely(self.grade_fn, output, gold))
                    bar.update()
                return results
            try:
                return self._grade_in_workers(items, bar)
            except BaseException:
                # Busy workers would answer a later call with this call's items: start afresh.
                self.close()
                raise

    def _grade_in_workers(self, items: Sequence[tuple[str, Any]], bar: tqdm) -> list[GradeResult]:
        while len(self._workers) < min(self.num_workers, len(items)):
            self._workers.append(_Worker(self._ctx, self.grade_fn))
        results: list[GradeResult | None] = [None] * len(items)
        pending = deque(range(len(items)))
        remaining = len(items)

        def finish(index: int, result: GradeResult) -> None:
            nonlocal remaining
            results[index] = result
            remaining -= 1
            bar.update()

        while remaining:
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.task is None and pending:
                    index = pending.popleft()
                    output, gold = items[index]
                    try:
                        worker.conn.send((index, output, gold))
                    except (BrokenPipeError, OSError):
                        pending.appendleft(index)  # the worker died idle: retry on a fresh one
                        self._replace(slot)
                        continue
                    worker.task = (index, time.monotonic() + self.timeout_s)

            now = time.monotonic()
            deadlines = [w.task[1] for w in self._workers if w.task is not None]
            deadlines += [w.started_at + self.startup_timeout_s for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            ready_conns = multiprocessing.connection.wait([w.conn for w in self._workers], wait_s)

            for slot, worker in enumerate(self._workers):
                if worker.conn not in ready_conns:
                    continue
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    self._on_worker_death(slot, finish)
                    continue
                if message == _READY:
                    worker.ready = True
                    continue
                index, result = message
                worker.task = None
                finish(index, result)

            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.task is not None and now >= worker.task[1]:
                    index = worker.task[0]
                    self.num_timeouts += 1
                    self._replace(slot)
                    error = f"timed out after {self.timeout_s:g} s"
                    finish(index, GradeResult(correct=False, timed_out=True, error=error))
                elif not worker.ready and now >= worker.started_at + self.startup_timeout_s:
                    self.close()
                    raise RuntimeError(
                        f"a grading worker did not start within {self.startup_timeout_s:g} s; "
                        "raise startup_timeout_s or check that the grading function's module imports"
                    )
        graded = [result for result in results if result is not None]
        if len(graded) != len(items):
            raise RuntimeError(f"internal error: {len(items) - len(graded)} items were never graded")
        return graded

    def _on_worker_death(self, slot: int, finish: Callable[[int, GradeResult], None]) -> None:
        worker = self._workers[slot]
        worker.process.join(timeout=5)
        exit_code = worker.process.exitcode
        if not worker.ready:
            self.close()
            raise RuntimeError(
                f"a grading worker exited with code {exit_code} before it was ready; "
                "the grading function or its module probably fails to import (see stderr above)"
            )
        task = worker.task
        self._replace(slot)
        if task is not None:
            error = f"grading worker died (exit code {exit_code})"
            finish(task[0], GradeResult(correct=False, error=error))

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self._ctx, self.grade_fn)
