"""Loading the four Table 1 benchmarks from the authors' files, through the Hydra config nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from palign.artifacts.errors import DataFormatError
from palign.evaluation.benchmarks import BenchmarkProblem, load_benchmark

REPO = Path(__file__).resolve().parents[2]
from tests.conftest import SHARED_DATA  # noqa: E402  (honours PALIGN_SHARED_DATA)

EXPECTED_ROWS = {"aime24": 30, "aime25": 30, "amc12": 83, "math500": 500}


def benchmark_config(name: str) -> dict:
    """The config node as the main config will see it, with `paths.shared_data` resolved."""
    root = OmegaConf.create({"paths": {"shared_data": str(SHARED_DATA)}})
    root.benchmark = OmegaConf.load(REPO / "conf" / "benchmark" / f"{name}.yaml")
    return OmegaConf.to_container(root.benchmark, resolve=True)


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_load_paper_benchmark_from_local_file(name: str) -> None:
    config = benchmark_config(name)
    if not Path(config["local_path"]).exists():
        pytest.skip(f"shared benchmark data not found at {config['local_path']} (needs ../shared/data)")
    assert "_target_" not in config
    problems = load_benchmark(**config)
    assert len(problems) == EXPECTED_ROWS[name]
    assert all(isinstance(p.answer, str) and p.answer for p in problems)
    assert all(isinstance(p.problem, str) and p.problem for p in problems)
    assert len({p.id for p in problems}) == len(problems)


def test_loaded_answers_are_normalised() -> None:
    if not (SHARED_DATA / "benchmarks").exists():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA / 'benchmarks'}")
    amc12 = load_benchmark(**benchmark_config("amc12"))
    assert amc12[0].answer == "142"  # stored as 142.0
    assert not any(p.answer.endswith(".0") for p in amc12)
    aime25 = load_benchmark(**benchmark_config("aime25"))
    assert aime25[0] == BenchmarkProblem(
        id="0",
        problem="Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b.$",
        answer="70",
    )
    math500 = load_benchmark(**dict(benchmark_config("math500"), limit=5))
    assert len(math500) == 5 and math500[0].id.startswith("test/")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_ids_default_to_row_index_and_json_lists_load(tmp_path: Path) -> None:
    records = [{"problem": "1+1?", "answer": 2}, {"problem": "half of 1?", "answer": 0.5}]
    jsonl = write_lines(tmp_path / "tiny.jsonl", [json.dumps(r) for r in records])
    as_list = tmp_path / "tiny.json"
    as_list.write_text(json.dumps(records), encoding="utf-8")
    expected = [BenchmarkProblem("0", "1+1?", "2"), BenchmarkProblem("1", "half of 1?", "0.5")]
    assert load_benchmark("tiny", local_path=jsonl) == expected
    assert load_benchmark("tiny", local_path=as_list) == expected


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "broken.jsonl",
        [json.dumps({"problem": "a", "answer": "1"}), "", '{"problem": "b", "answer": '],
    )
    with pytest.raises(DataFormatError, match=r"broken\.jsonl:3: malformed JSON line"):
        load_benchmark("broken", local_path=path)


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "fields.jsonl",
        [json.dumps({"question": "a", "answer": "1"}), json.dumps({"question": "b", "solution": "2"})],
    )
    with pytest.raises(DataFormatError, match=r"fields\.jsonl:2: missing field 'answer'"):
        load_benchmark("fields", local_path=path, problem_field="question")
    with pytest.raises(DataFormatError, match=r"fields\.jsonl:1: missing field 'problem'"):
        load_benchmark("fields", local_path=path)


def test_empty_or_unusable_answers_are_reported(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "empty.jsonl", [json.dumps({"problem": "a", "answer": "  "})])
    with pytest.raises(DataFormatError, match=r"empty\.jsonl:1: field 'answer' is empty"):
        load_benchmark("empty", local_path=path)
    path = write_lines(tmp_path / "typed.jsonl", [json.dumps({"problem": "a", "answer": None})])
    with pytest.raises(DataFormatError, match=r"typed\.jsonl:1: field 'answer'"):
        load_benchmark("typed", local_path=path)


def test_repeated_ids_are_reported(tmp_path: Path) -> None:
    # amc12.jsonl restarts `id` at 0 for its 2023 half; loading by that field must not collide.
    path = write_lines(
        tmp_path / "dup.jsonl",
        [json.dumps({"id": 0, "problem": p, "answer": 1}) for p in ("a", "b")],
    )
    expected = r"dup\.jsonl:2: id '0' \(field 'id'\) repeats .*dup\.jsonl:1"
    with pytest.raises(DataFormatError, match=expected):
        load_benchmark("dup", local_path=path, id_field="id")
    assert [p.id for p in load_benchmark("dup", local_path=path)] == ["0", "1"]


def test_no_local_file_and_no_hub_id_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no hub_id"):
        load_benchmark("nowhere", local_path=tmp_path / "missing.jsonl")


def test_null_local_path_loads_from_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # the Hub is unreachable in tests: `datasets.load_dataset` stands in for it
    import datasets

    calls = []

    def fake_load_dataset(hub_id: str, split: str):
        calls.append((hub_id, split))
        return [{"problem": "p", "answer": 142.0, "id": 7}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_benchmark(
        "amc12",
        local_path=None,
        hub_id="AI-MO/aimo-validation-amc",
        hub_split="train",
        id_field="id",
    )
    assert calls == [("AI-MO/aimo-validation-amc", "train")]
    assert problems == [BenchmarkProblem("7", "p", "142")]
