"""Strict readers of JSON and JSONL records: a malformed file, line or field fails naming where and how to fix it.

Teacher sources, benchmarks, predictions and the report read their inputs here, never with a bare
`json.loads` whose `KeyError` or `UnicodeDecodeError` would come from deep inside a loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from palign.artifacts.errors import DataFormatError


def _invalid_utf8(path: Path, data: bytes, err: UnicodeDecodeError, first_lineno: int = 1) -> DataFormatError:
    """The error for undecodable `data` (a line, or a whole file starting at `first_lineno`)."""
    lineno = first_lineno + data.count(b"\n", 0, err.start)
    column = err.start - data.rfind(b"\n", 0, err.start)  # 1-based, in bytes
    return DataFormatError(
        f"{path}:{lineno}: invalid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
        "JSON files must be UTF-8: re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
    )


def json_error_text(err: json.JSONDecodeError) -> str:
    """What is wrong and where on its line: `Expecting value at column 7`. Some of Python's messages
    end in "at" themselves (`Unterminated string starting at`, `Invalid control character at`): it is
    said once."""
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def read_json(path: str | os.PathLike) -> Any:
    """One JSON document; malformed JSON or invalid UTF-8 raises naming file and line."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _invalid_utf8(path, raw, err) from err
    if not text.strip():
        raise DataFormatError(f"{path}: the file is empty (0 bytes or only blank lines); expected one JSON document")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}: malformed JSON ({json_error_text(err)})") from err


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line number, object)` for a JSONL file; a malformed line raises naming file and line.

    Blank lines are skipped. Lines are decoded one at a time, so invalid UTF-8 is reported with its
    line rather than as a bare `UnicodeDecodeError` from deep inside the file object.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _invalid_utf8(path, raw, err, first_lineno=lineno) from err
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{path}:{lineno}: malformed JSON line ({json_error_text(err)}); "
                    "each line must be one complete JSON object"
                ) from err
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    for _, obj in iter_jsonl(path):
        yield obj


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(where, record)` from a `.jsonl` file or a `.json` list of objects.

    `where` ("file:line", or "file: record i" for a JSON list) is what error messages cite.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        for index, record in enumerate(data):
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
            yield f"{path}: record {index}", record
        return
    for lineno, record in iter_jsonl(path):
        yield f"{path}:{lineno}", record


def json_kind(value: Any) -> str:
    """How a value reads in the file: `null`, `a boolean (true)`, `a number (3.5)`, `a list ([...])`."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if value is None:
        return "null"
    kind = (
        "a boolean"
        if isinstance(value, bool)
        else "a number"
        if isinstance(value, (int, float))
        else "a list"
        if isinstance(value, (list, tuple))
        else "an object"
        if isinstance(value, dict)
        else f"a {type(value).__name__}"
    )
    return f"{kind} ({shown})"


def record_id(value: Any, field: str, where: str, fix: str) -> str:
    """A record id as text: a non-empty string, or an integer (one spelling only: 7 -> "7").

    Ids key every cached stage and result file; null, floats, booleans and lists would become
    "None", "3.0", "True" or a repr, so they are refused naming `where` and `field`, with `fix`.
    """
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    shown = "an empty string" if isinstance(value, str) else json_kind(value)
    raise DataFormatError(
        f"{where}: field '{field}' must be a non-empty string or an integer (the record id), got {shown}; {fix}"
    )


def require_field(record: Mapping[str, Any], field: str, where: str) -> Any:
    """`record[field]` (dotted paths and list indices like `code.0` allowed) or a clear error."""
    value: Any = record
    for part in field.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            keys = ", ".join(sorted(record)) if isinstance(record, Mapping) else type(record).__name__
            raise DataFormatError(
                f"{where}: missing field '{field}' (available: {keys}); "
                "set the field name in the teacher/benchmark config"
            )
    return value
