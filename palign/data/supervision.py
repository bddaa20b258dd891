"""Supervision targets: what each baseline asks the student to imitate (PAPER.md §1.4, §6).

- `long_cot`: the full teacher trace (SFT Long-CoT baseline, PAPER.md §1.3).
- `short_cot`: the short reference solution (SFT Short-CoT baseline).
- `prefix_continuation`: prefix markers + teacher prefix + the student's own continuation, the
  P-ALIGN target `<Begin_of_Prefix>{prefix}<End_of_Prefix>\\n{continuation}` (also used with a
  fixed-ratio prefix).
- `prefix_only`: the teacher prefix alone (ablation).
- `student_only`: the student's own correct solution without any prefix (ablation).
Records a target cannot be built for are skipped and counted by reason. The names are the schema's
`TARGETS` (palign/schema.py: a baseline's `target`, the chain judge's `chain_a`/`chain_b`); a new
target is a name there and its text here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from palign.data.sft import SupervisedExample
from palign.schema import TARGETS
from palign.teachers.records import TeacherRecord

# the targets built from stage 1's prefixes, and from stage 2's continuations (the baseline must make them)
PREFIX_TARGETS = ("prefix_continuation", "prefix_only")
CONTINUATION_TARGETS = ("prefix_continuation", "student_only")


def build_targets(
    records: Sequence[TeacherRecord],
    target: str,
    prefixes: Mapping[str, str] | None = None,
    continuations: Mapping[str, str] | None = None,
    markers: Mapping[str, str] | None = None,
) -> tuple[list[SupervisedExample], Counter]:
    """SFT examples for `target`; `prefixes`/`continuations` map record id to text."""
    if target not in TARGETS:
        raise ValueError(f"baseline.target must be one of {TARGETS}, got '{target}'")
    needs_prefix = target in PREFIX_TARGETS
    needs_continuation = target in CONTINUATION_TARGETS
    if needs_prefix and prefixes is None:
        raise ValueError(f"target '{target}' needs the truncation stage's prefixes")
    if needs_continuation and continuations is None:
        raise ValueError(f"target '{target}' needs the alignment stage's continuations")
    examples: list[SupervisedExample] = []
    skipped: Counter = Counter()
    for record in records:
        meta: dict[str, Any] = {"answer": record.answer}
        if target == "long_cot":
            text = record.long_cot
        elif target == "short_cot":
            if not record.short_cot:
                skipped["no short CoT"] += 1
                continue
            text = record.short_cot
        else:
            prefix = prefixes.get(record.id) if needs_prefix else None
            continuation = continuations.get(record.id) if needs_continuation else None
            if needs_prefix and prefix is None:
                skipped["no prefix"] += 1
                continue
            if needs_continuation and continuation is None:
                skipped["continuation missing or wrong"] += 1
                continue
            if target == "prefix_continuation":
                text = f"{markers['begin']}{prefix}{markers['end']}\n{continuation}"
            elif target == "prefix_only":
                text = prefix
            else:
                text = continuation
        examples.append(SupervisedExample(id=record.id, question=record.question, target=text, meta=meta))
    return examples, skipped
