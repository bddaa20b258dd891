"""The vocabulary of palign's config schema: `knob` declares a field with its one default, its
documentation and its check; `at_least`, `number`, `one_of`, INTEGER and FINITE are the checks.

It lies at the bottom of the layers (pyproject.toml: importlinter) so that a config node defined
with its code below the schema (the model spec and the sampling settings in palign/llm/) declares
its fields the same way, and palign/schema.py uses that class as the node: one home per default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import field
from typing import Any

from omegaconf import MISSING

Check = tuple[str, Callable[[Any], bool]]


def knob(
    default: Any = MISSING,
    help: str = "",
    *,
    identity: bool = True,
    check: Check | None = None,
    content: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A schema field: its default (or `factory` for a mutable one), documentation and checks."""
    metadata = {"help": help, "identity": identity, "check": check, "content": content}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


INTEGER: Check = ("an integer", is_int)
FINITE: Check = ("a finite number", is_number)


def at_least(low: int, *, optional: str | None = None) -> Check:
    text = f"an integer >= {low}"
    if optional:
        return f"null ({optional}) or {text}", lambda v: v is None or (is_int(v) and v >= low)
    return text, lambda v: is_int(v) and v >= low


def number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> Check:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    text = (
        f"a number > {low}"
        if high is None and low_open
        else f"a number >= {low}"
        if high is None
        else f"a number in {lo}{low}, {high}{hi}"
    )

    def test(v: Any) -> bool:
        if not is_number(v) or v < low or (low_open and v == low):
            return False
        return high is None or v < high or (v == high and not high_open)

    return text, test


def one_of(*allowed: Any) -> Check:
    return f"one of {list(allowed)}", lambda v: v in allowed
