"""Units of a teacher trace and the prefixes rebuilt from them (PAPER.md §1.2, §2.1 item 2).

Stage 1 searches over prefixes `P_t = {r_1, ..., r_t}` of a teacher trajectory `R = {r_1, ..., r_m}`
(PAPER.md §1.2). What a "step" `r_t` is decides what a prefix can look like, so the splitter is a
choice: the `truncation.granularity` node (conf/truncation/granularity/) names one of the `Splitter`
classes below by its `_target_`, with its options; a new granularity is one class here and one YAML
file there.

- `paper_sentence`: exactly the authors' `split_sentences` (PAPER.md §2.1 item 2): split on ". "
  only, strip each piece, append "." to a piece whose *unstripped* text does not end in ".", drop
  pieces that are empty after stripping, and join a prefix with single spaces. This does not
  reproduce the original text (newlines collapse into the units, and a piece such as "x.\\n" becomes
  "x.." - see PAPER.md §9 item 12); it is kept for faithfulness to the released code.
- `sentence`: a robust sentence splitter whose units are contiguous slices of the text.
- `step`: paragraph steps separated by blank lines, also contiguous slices.
- `token_chunk`: chunks of `chunk_tokens` tokens of a Hugging Face tokenizer, cut at token start
  offsets, also contiguous slices.

For the three contiguous granularities, the units concatenate to the text exactly (leading
whitespace belongs to the first unit, every unit keeps its trailing whitespace), no unit is
whitespace-only, and `prefix(k)` is `"".join(units[:k]).rstrip()`: a literal prefix of the text,
with `prefix(m) == text.rstrip()`. An empty or whitespace-only text has no units (`m == 0`).
"""

from __future__ import annotations

import bisect
import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar

__all__ = [
    "ABBREVIATIONS",
    "PaperSentences",
    "Segmentation",
    "Sentences",
    "Splitter",
    "Steps",
    "TokenChunks",
    "math_spans",
    "split_paper_sentences",
    "split_sentences",
    "split_steps",
    "split_token_chunks",
]


@dataclass(frozen=True)
class Segmentation:
    """A trace cut into units, and the prefixes the truncation search chooses among.

    `joiner` is "" when the units are contiguous slices of `text` (prefixes are literal prefixes
    of `text`), or the separator the units are re-joined with otherwise (" " for `paper_sentence`).
    """

    text: str
    units: tuple[str, ...]
    joiner: str
    granularity: str

    def __post_init__(self) -> None:
        if self.is_literal and self.units and "".join(self.units) != self.text:
            raise ValueError(
                f"granularity {self.granularity!r}: contiguous units must concatenate to the text; "
                "this is a bug in the splitter"
            )

    @property
    def m(self) -> int:
        """The number of units (the paper's m)."""
        return len(self.units)

    @property
    def is_literal(self) -> bool:
        """Whether every prefix is a literal prefix of `text`."""
        return self.joiner == ""

    def prefix(self, k: int) -> str:
        """The first `k` units (1 <= k <= m) as text; `prefix(m)` is the whole trace."""
        if not 1 <= k <= self.m:
            raise ValueError(
                f"prefix length k={k} is out of range: this {self.granularity!r} segmentation has "
                f"m={self.m} units, so k must be in 1..{self.m}"
            )
        if self.is_literal:
            return "".join(self.units[:k]).rstrip()
        return self.joiner.join(self.units[:k])


class Splitter(ABC):
    """A granularity: cuts a trace into units. Subclasses are frozen dataclasses whose fields are the
    options their YAML file lists (the one home of each option's value); `name` names the units in
    the stored rows, the store's folder and its fingerprint."""

    name: ClassVar[str]

    @abstractmethod
    def split(self, text: str, tokenizer: Any) -> Segmentation:
        """`text` cut into units; `tokenizer` is the student's (read by token-based splitters only)."""

    def options(self) -> dict[str, Any]:
        """The splitter's options (its dataclass fields), as the truncation store's fingerprint holds them."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self)} if is_dataclass(self) else {}


def _contiguous(text: str, boundaries: Sequence[int], granularity: str) -> Segmentation:
    """Slice `text` at `boundaries`, merging a whitespace-only unit into its neighbour.

    A boundary is kept only if the unit it closes contains non-whitespace, so a whitespace-only
    run joins the unit after it (leading whitespace) or the unit before it (the trailing run).
    """
    if not text.strip():
        return Segmentation(text=text, units=(), joiner="", granularity=granularity)
    cuts = [0]
    for boundary in sorted(set(boundaries)):
        if cuts[-1] < boundary < len(text) and text[cuts[-1] : boundary].strip():
            cuts.append(boundary)
    if not text[cuts[-1] :].strip():
        cuts.pop()  # the trailing run is whitespace-only: it stays with the last real unit
    cuts.append(len(text))
    units = tuple(text[start:end] for start, end in itertools.pairwise(cuts))
    return Segmentation(text=text, units=units, joiner="", granularity=granularity)


# --- paper_sentence -------------------------------------------------------------------------------


def split_paper_sentences(text: str) -> Segmentation:
    """The authors' splitter, rule for rule (PAPER.md §2.1 item 2): prefixes join with " "."""
    units = tuple(
        piece.strip() + "." if not piece.endswith(".") else piece.strip() for piece in text.split(". ") if piece.strip()
    )
    return Segmentation(text=text, units=units, joiner=" ", granularity="paper_sentence")


@dataclass(frozen=True)
class PaperSentences(Splitter):
    """The authors' `split_sentences` (`split_paper_sentences`)."""

    name: ClassVar[str] = "paper_sentence"

    def split(self, text: str, tokenizer: Any) -> Segmentation:
        return split_paper_sentences(text)


# --- sentence -------------------------------------------------------------------------------------

# Words that end in a period without ending a sentence, compared lower-cased with the period and
# any opening brackets or quotes removed.
ABBREVIATIONS = frozenset(
    {
        "e.g", "i.e", "etc", "vs", "cf", "viz", "approx", "resp", "w.r.t", "a.k.a", "al", "ca",
        "dr", "mr", "mrs", "ms", "prof", "jr", "sr", "fig", "figs", "eq", "eqs", "thm", "lem",
    }
)  # fmt: skip
_MATH_ENVIRONMENTS = (
    "equation", "align", "alignat", "flalign", "gather", "multline", "eqnarray", "displaymath",
    "math",
)  # fmt: skip
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_WHITESPACE_RUN = re.compile(r"\s+")
_BEGIN_ENVIRONMENT = re.compile(r"\\begin\{(" + "|".join(_MATH_ENVIRONMENTS) + r")(\*?)\}")
_CLOSERS = "\"')]}*”’»"
_OPENERS = "\"'([{*“‘«"


def _is_escaped(text: str, position: int) -> bool:
    """Whether the character at `position` follows an odd number of backslashes."""
    backslashes = 0
    while position - backslashes - 1 >= 0 and text[position - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _find_unescaped(text: str, delimiter: str, start: int, stop: int) -> int:
    """The first position in [start, stop) where an unescaped `delimiter` starts, or -1."""
    position = text.find(delimiter, start, stop)
    while position != -1 and _is_escaped(text, position):
        position = text.find(delimiter, position + 1, stop)
    return position


def math_spans(text: str) -> list[tuple[int, int]]:
    """Half-open spans of `$..$`, `$$..$$`, `\\(..\\)`, `\\[..\\]` and display environments.

    LaTeX forbids a blank line inside math, so a delimiter with no closer before the next blank
    line is taken as a literal character (a stray `$` cannot silence the rest of a trace).
    """
    blank_line_starts = [match.start() for match in _BLANK_LINE.finditer(text)]
    spans: list[tuple[int, int]] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char not in "$\\":
            position += 1
            continue
        if char == "\\" and text[position + 1 : position + 2] not in ("(", "[", "b"):
            position += 2  # an escaped character such as \$ or a macro name
            continue
        if text.startswith("$$", position):
            opener, closer = "$$", "$$"
        elif char == "$":
            opener, closer = "$", "$"
        elif text.startswith("\\(", position):
            opener, closer = "\\(", "\\)"
        elif text.startswith("\\[", position):
            opener, closer = "\\[", "\\]"
        else:
            environment = _BEGIN_ENVIRONMENT.match(text, position)
            if environment is None:
                position += 2
                continue
            opener = environment.group(0)
            closer = "\\end{" + environment.group(1) + environment.group(2) + "}"
        next_blank = bisect.bisect_right(blank_line_starts, position)
        stop = blank_line_starts[next_blank] if next_blank < len(blank_line_starts) else len(text)
        close_at = _find_unescaped(text, closer, position + len(opener), stop)
        if close_at == -1:
            position += len(opener)
            continue
        end = close_at + len(closer)
        spans.append((position, end))
        position = end
    return spans


def _ends_sentence(text: str, before: int) -> bool:
    """Whether the non-space text ending at `before` closes a sentence (before a space)."""
    end = before
    while end > 0 and text[end - 1] in _CLOSERS:
        end -= 1
    if end == 0 or text[end - 1] not in ".?!":
        return False
    if text[end - 1] != ".":
        return True
    word_start = end - 1
    while word_start > 0 and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start : end - 1].lstrip(_OPENERS)
    if word.lower() in ABBREVIATIONS:
        return False
    line_start = text.rfind("\n", 0, word_start) + 1
    at_line_start = not text[line_start:word_start].strip(" \t#>-*")
    list_marker = at_line_start and (word.isdigit() or (len(word) == 1 and word.isalpha()))  # "1." or "a."
    return not list_marker


def split_sentences(text: str) -> Segmentation:
    """Sentences, cut after whitespace that follows `.`, `?` or `!`, and after every newline.

    No cut inside math (see `math_spans`), after an abbreviation (`e.g.`, `etc.`, `Dr.` ...; see
    `ABBREVIATIONS`), or after a list marker (`1.`, `a.`) at the start of a line. Decimals such as
    `3.5` are never cut because a cut needs whitespace after the period. Closing quotes, brackets
    and Markdown `*` may sit between the terminator and the whitespace (`**Done.** Next`).
    """
    spans = math_spans(text)
    span_starts = [start for start, _ in spans]

    def inside_math(position: int) -> bool:
        index = bisect.bisect_right(span_starts, position) - 1
        return index >= 0 and position < spans[index][1]

    boundaries = []
    for run in _WHITESPACE_RUN.finditer(text):
        if inside_math(run.start()):
            continue
        if "\n" in run.group() or _ends_sentence(text, run.start()):
            boundaries.append(run.end())
    return _contiguous(text, boundaries, "sentence")


@dataclass(frozen=True)
class Sentences(Splitter):
    """Robust sentences (`split_sentences`)."""

    name: ClassVar[str] = "sentence"

    def split(self, text: str, tokenizer: Any) -> Segmentation:
        return split_sentences(text)


# --- step -----------------------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")


def split_steps(text: str) -> Segmentation:
    """Paragraph steps: a cut after every run of whitespace that contains a blank line."""
    boundaries = [match.end() for match in _PARAGRAPH_BREAK.finditer(text)]
    return _contiguous(text, boundaries, "step")


@dataclass(frozen=True)
class Steps(Splitter):
    """Paragraph steps (`split_steps`)."""

    name: ClassVar[str] = "step"

    def split(self, text: str, tokenizer: Any) -> Segmentation:
        return split_steps(text)


# --- token_chunk ----------------------------------------------------------------------------------


def split_token_chunks(text: str, *, tokenizer: Any, chunk_tokens: int) -> Segmentation:
    """Chunks of `chunk_tokens` tokens, cut where each chunk's first token starts in the text.

    `tokenizer` is a fast Hugging Face tokenizer (offsets need one). Tokens that share a start
    offset (pieces of one multi-byte character) cannot be separated, and a whitespace-only chunk
    merges into its neighbour, so a chunk can hold slightly more than `chunk_tokens` tokens.
    """
    if chunk_tokens < 1:
        raise ValueError(f"token_chunk: chunk_tokens must be >= 1, got {chunk_tokens}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"token_chunk needs a fast tokenizer for character offsets; got {type(tokenizer).__name__}")
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    starts = [start for start, _ in encoding["offset_mapping"]]
    return _contiguous(text, starts[chunk_tokens::chunk_tokens], "token_chunk")


@dataclass(frozen=True)
class TokenChunks(Splitter):
    """Chunks of `chunk_tokens` tokens of the student's tokenizer (`split_token_chunks`)."""

    name: ClassVar[str] = "token_chunk"
    chunk_tokens: int

    def __post_init__(self) -> None:
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"token_chunk: chunk_tokens must be an integer >= 1, got {self.chunk_tokens!r}")

    def split(self, text: str, tokenizer: Any) -> Segmentation:
        return split_token_chunks(text, tokenizer=tokenizer, chunk_tokens=self.chunk_tokens)
