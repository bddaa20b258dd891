"""The report (palign/reporting, experiments/make_table.py): Table 1 cells, the samples statement,
ablation grouping, unfinished runs, figures, and the same on two real run folders. Intervals, paired
differences, seeds and published rows: tests/reporting/test_comparisons.py."""

from __future__ import annotations

import copy
import importlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from palign.reporting.plots import (
    plot_accuracy_vs_length,
    plot_prefix_ratios,
    plot_sufficiency_curves,
    truncation_rows_by_config,
)
from palign.reporting.tables import (
    KNOBS,
    RunRecord,
    ablation_groups,
    build_tables,
    collect_local_runs,
    summary_from_wandb,
)
from palign.schema import Report
from tests.conftest import PROJECT_ROOT, run_cli

STUDENT = "qwen2_5_7b_instruct"
PREFIXES = "palign.truncation.prefixes"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def base_config(student: str = STUDENT) -> dict:
    """A resolved run config with the schema palign.pipeline writes (conf/config.yaml)."""
    student_cfg = {
        "name": student,
        "source": "hub",
        "pretrained": f"org/{student}",
        "dtype": "bfloat16",
        "attn_implementation": "sdpa",
        "chat_template_kwargs": {},
    }
    return {
        "stage": "all",
        "seed": 0,
        "predictions": None,
        "run_name": "x",
        "group": "sweep",
        "tags": [],
        "paths": {
            "root": "/nonexistent/outputs",
            "runs": "/nonexistent/outputs/runs",
            "cache_dir": "/nonexistent/outputs/cache",
        },
        "prompts": {"instruction": "Please reason step by step, and put your final answer within \\boxed{}."},
        "student": student_cfg,
        "teacher": {"name": "s1k", "source": {"_target_": "palign.teachers.sources.S1KTeacher", "limit": None}},
        "baseline": {
            "name": "sft_long_cot",
            "target": "long_cot",
            "prefix": {"_target_": f"{PREFIXES}.NoPrefix"},
            "alignment": False,
        },
        "truncation": {
            "granularity": {"_target_": "palign.truncation.units.PaperSentences"},
            "search": {"_target_": "palign.truncation.search.BinaryPrefixSearch", "_partial_": True},
            "chunk_size": 32,
            "judge": {
                "model": copy.deepcopy(student_cfg),
                "mode": "logits",
                "max_new_tokens": 256,
                "batch_size": 8,
                "threshold": {"_target_": "palign.truncation.judge.AbsoluteThreshold", "value": 0.0},
            },
            "judge_prompt": {
                "name": "paper",
                "enough": "[ENOUGH]",
                "not_enough": "[NOT_ENOUGH]",
                "template": "{question} {reasoning_part}",
            },
        },
        "data": {"max_length": 16384, "micro_batch_size": 1, "val_size": 0, "train_limit": None, "num_workers": 0},
        "training": {"learning_rate": 1e-4, "epochs": 3, "effective_batch_size": 16, "lora": {"r": 16, "alpha": 16}},
        "trainer": {"_target_": "pytorch_lightning.Trainer", "accelerator": "gpu", "devices": 1},
        "alignment": {"filter": "correct", "sampling": {"max_new_tokens": 4096}, "chunk_size": 32},
        "evaluation": {
            "benchmarks": {b: {"name": b} for b in ("aime24", "aime25", "amc12", "math500")},
            "model_path": None,
            "sampling": {"max_new_tokens": 4096, "num_samples": 3, "temperature": 0.6},
            "pass_k": 3,
        },
        "logger": {"kind": "none"},
    }


BASELINES = {
    name: yaml.safe_load((PROJECT_ROOT / "conf" / "baseline" / f"{name}.yaml").read_text(encoding="utf-8"))
    for name in ("sft_long_cot", "sft_short_cot", "palign", "prefix_only", "student_only", "fixed_ratio")
}
SIZES = {"aime25": 30, "aime24": 30, "amc12": 83, "math500": 500}


def bench(pass1: float, pass3: float, problems: int, samples: int = 3, tokens: int = 4096) -> dict:
    return {
        "pass@1": pass1,
        "pass@1_first": pass1,
        f"pass@{samples}": pass3,
        "num_problems": problems,
        "num_samples": samples,
        "num_timeouts": 0,
        "num_errors": 0,
        "max_new_tokens": tokens,
        "truncated_rate": 0.0,
    }


def write_run(
    runs: Path,
    name: str,
    baseline: str,
    pass1: dict[str, float] | None = None,
    *,
    student: str = STUDENT,
    set_: dict | None = None,
    prefix_ratio: float | None = None,
    retention: float | None = None,
    response_tokens: int | None = None,
    artifact: str | None = None,
) -> Path:
    """A run folder as the pipeline leaves it: config.yaml and summary.json (eval only when
    `pass1` is given: {benchmark: Pass@1}; Pass@3 is Pass@1 + 10)."""
    config = base_config(student)
    config["baseline"] = copy.deepcopy(BASELINES[baseline])
    for dotted, value in (set_ or {}).items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    summary: dict = {}
    if prefix_ratio is not None:
        summary["truncation"] = {
            "examples": 40,
            "skipped_no_units": 0,
            "prefix_ratio_mean": prefix_ratio,
            "prefix_ratio_median": prefix_ratio,
            "fallback_rate": 0.0,
            "judge_calls_per_example": 5.2,
            "artifact": artifact or f"/nonexistent/cache/truncation/{name}",
        }
    if retention is not None:
        summary["alignment"] = {
            "examples": 40,
            "correct": int(40 * retention),
            "retention": retention,
            "filter": "correct",
            "artifact": "/nonexistent/cache/alignment/x",
        }
    if response_tokens is not None:
        summary["data"] = {
            "teacher_records": 40,
            "train/examples": 40,
            "train/response_tokens": response_tokens,
            "train/dropped_too_long": 0,
        }
        summary["train"] = {"complete": True, "global_step": 9}
    if pass1 is not None:
        benchmarks = {b: bench(v, v + 10, SIZES[b]) for b, v in pass1.items()}
        summary["eval"] = {"benchmarks": benchmarks, "avg_pass@1": sum(pass1.values()) / len(pass1), "model": "student"}
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if summary:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return folder


def md_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """The first Markdown table's body rows keyed by their first two cells."""
    lines = markdown.split("\n\n")[0].strip().splitlines()[2:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {(r[0], r[1]): r[2:] for r in rows}


def section(markdown: str, title: str) -> str:
    return markdown[markdown.index(title) :]


# Paper-like numbers: (16.67 + 16.67 + 49.40 + 75.80) / 4 = 39.635 -> 39.64 when averaging the printed cells.
PAPER_ROW = {"aime25": 100 / 6, "aime24": 100 / 6, "amc12": 100 * 41 / 83, "math500": 75.8}


def test_table1_cells_average_samples_statement_and_missing_cells(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a-palign", "palign", PAPER_ROW, prefix_ratio=0.41, retention=0.6)
    write_run(runs, "b-long", "sft_long_cot", {"aime25": 10.0, "aime24": 13.333, "amc12": 40.0, "math500": 70.0})
    write_run(runs, "c-short", "sft_short_cot", {"math500": 60.125})
    write_run(runs, "d-fixed25", "fixed_ratio", {"math500": 71.0}, set_={"baseline.prefix.ratio": 0.25})
    write_run(runs, "e-fixed50", "fixed_ratio", {"math500": 72.0})
    write_run(runs, "f-other-student", "palign", {"math500": 20.0}, student="qwen3_8b")

    finished, unfinished = collect_local_runs(runs)
    assert unfinished == []
    markdown, csv_text, *_ = build_tables(finished, pass_k=3)["table1"]
    rows = md_rows(markdown)
    # Rows: students in order, the baselines before P-ALIGN; two fixed_ratio runs named by their ratio.
    assert list(rows) == [
        (STUDENT, "sft_short_cot"),
        (STUDENT, "sft_long_cot"),
        (STUDENT, "fixed_ratio (ratio=0.25)"),
        (STUDENT, "fixed_ratio (ratio=0.5)"),
        (STUDENT, "palign"),
        ("qwen3_8b", "palign"),
    ]
    # AIME25, AIME24, AMC12, MATH500 (Pass@1, Pass@3), Avg Pass@1, Avg Pass@3, then the differences of the Avg
    # from the student's sft_long_cot row: these summaries come without graded predictions, so the values stand
    # alone (no interval to resample, no pairs to compare)
    assert rows[(STUDENT, "palign")] == [
        "16.67",
        "26.67",
        "16.67",
        "26.67",
        "49.40",
        "59.40",
        "75.80",
        "85.80",
        "39.64",
        "49.64",
        "–",
        "–",
    ]
    assert rows[(STUDENT, "sft_long_cot")] == [
        "10.00",
        "20.00",
        "13.33",
        "23.33",
        "40.00",
        "50.00",
        "70.00",
        "80.00",
        "33.33",
        "43.33",
        "ref",
        "ref",
    ]
    # its Avg is over MATH500 alone, the reference's over four benchmarks: not comparable, and the note says why
    assert rows[(STUDENT, "sft_short_cot")] == ["–"] * 6 + ["60.13", "70.13", "60.13", "70.13", "refused", "refused"]
    assert (
        "cannot compare the Avg Pass@1 of c-short and b-long: they evaluated different benchmarks (math500 and "
        "aime25, aime24, amc12, math500)"
    ) in markdown
    assert rows[(STUDENT, "fixed_ratio (ratio=0.25)")][-6:-2] == ["71.00", "81.00", "71.00", "81.00"]
    assert rows[("qwen3_8b", "palign")][-2:] == ["–", "–"]  # no sft_long_cot run of its student: nothing to compare

    samples = md_rows(section(markdown, "| Student | Method | AIME25 | AIME24 | AMC12 | MATH500 | Run |"))
    assert samples[(STUDENT, "palign")] == [
        "30×3 (4096 tok)",
        "30×3 (4096 tok)",
        "83×3 (4096 tok)",
        "500×3 (4096 tok)",
        "a-palign",
    ]
    assert samples[(STUDENT, "sft_short_cot")] == ["–", "–", "–", "500×3 (4096 tok)", "c-short"]
    assert "Avg: unweighted mean of the row's printed cells" in markdown

    header, *body = [line.split(",") for line in csv_text.strip().splitlines()]
    short = dict(zip(header, next(r for r in body if r[1] == "sft_short_cot")))
    assert short["AIME25 Pass@1"] == "" and short["MATH500 Pass@1"] == "60.13" and short["Avg Pass@3"] == "70.13"
    assert short["MATH500 Pass@1 ci_low"] == short["MATH500 Pass@1 ci_high"] == short["MATH500 Pass@1 seed_sd"] == ""
    assert (short["MATH500 problems"], short["MATH500 samples"], short["MATH500 max_new_tokens"]) == (
        "500",
        "3",
        "4096",
    )
    assert short["AIME24 problems"] == "" and short["Run"] == "c-short"


def test_pass_k_column_is_missing_when_fewer_samples_were_drawn(tmp_path):
    runs = tmp_path / "runs"
    folder = write_run(runs, "two-samples", "palign", {"math500": 50.0})
    summary = json.loads((folder / "summary.json").read_text())
    summary["eval"]["benchmarks"]["math500"] = bench(50.0, 75.0, 500, samples=2, tokens=8)
    (folder / "summary.json").write_text(json.dumps(summary))
    markdown = build_tables(collect_local_runs(runs)[0], pass_k=3)["table1"].markdown
    assert md_rows(markdown)[(STUDENT, "palign")][-4:] == ["50.00", "–", "50.00", "–"]
    assert "500×2 (8 tok)" in markdown


def test_unfinished_runs_are_left_out_and_named(tmp_path, caplog):
    runs = tmp_path / "runs"
    write_run(runs, "done", "palign", {"math500": 50.0})
    write_run(runs, "trained-not-evaluated", "palign", None, response_tokens=4000)
    write_run(runs, "just-started", "palign", None)  # config.yaml only
    (runs / ".done.tmp").mkdir()  # an atomic write's leftover is no run

    finished, unfinished = collect_local_runs(runs)
    assert [r.name for r in finished] == ["done"]
    assert unfinished == ["just-started", "trained-not-evaluated"]
    assert "just-started, trained-not-evaluated" in caplog.text

    make_table = _make_table_module()
    result = make_table.make_report(runs, tmp_path / "report", Report(pass_k=3))
    assert result["unfinished"] == ["just-started", "trained-not-evaluated"]
    assert "Not evaluated yet, left out: just-started, trained-not-evaluated." in Path(result["report"]).read_text()


def test_ablation_tables_group_runs_that_differ_in_one_knob(tmp_path):
    runs = tmp_path / "runs"
    step, reachable = (
        {"truncation.granularity._target_": "palign.truncation.units.Steps"},
        {"truncation.judge_prompt.name": "answer_reachable", "truncation.judge_prompt.template": "reach {question}"},
    )
    write_run(runs, "A", "palign", {"math500": 60.0}, prefix_ratio=0.4132, retention=0.6)
    write_run(runs, "B", "palign", {"math500": 58.0}, set_=step, prefix_ratio=0.5, retention=0.55)
    write_run(runs, "C", "palign", {"math500": 57.0}, set_=reachable, prefix_ratio=0.3, retention=0.5)
    write_run(runs, "D", "palign", {"math500": 56.0}, set_={**step, **reachable}, prefix_ratio=0.35, retention=0.45)
    write_run(runs, "E", "prefix_only", {"math500": 52.0}, prefix_ratio=0.4132)
    write_run(runs, "F", "student_only", {"math500": 50.0}, retention=0.7)
    write_run(
        runs,
        "G",
        "fixed_ratio",
        {"math500": 55.0},
        set_={"baseline.prefix.ratio": 0.25},
        prefix_ratio=0.26,
        retention=0.4,
    )
    write_run(runs, "H", "fixed_ratio", {"math500": 54.5}, prefix_ratio=0.51, retention=0.5)
    write_run(runs, "I", "sft_long_cot", {"math500": 40.0})
    write_run(runs, "J", "palign", {"math500": 61.0}, set_={"truncation.judge.mode": "generate"})
    write_run(runs, "K", "palign", {"math500": 45.0}, set_={"training.learning_rate": 2e-5})  # not a knob: no ablation

    finished, _ = collect_local_runs(runs)
    knobs = {knob.name: knob for knob in KNOBS}
    names = lambda groups: [[r.name for r in group] for group in groups]  # noqa: E731
    # granularity varies at two judge prompts; fixed_ratio's granularity matches A's, but its baseline does not
    assert names(ablation_groups(finished, knobs["granularity"])) == [["A", "B"], ["C", "D"]]
    assert names(ablation_groups(finished, knobs["judge_prompt"])) == [["C", "A"], ["D", "B"]]  # by value
    assert names(ablation_groups(finished, knobs["judge_mode"])) == [["J", "A"]]
    assert names(ablation_groups(finished, knobs["ratio"])) == [["G", "H"]]
    assert names(ablation_groups(finished, knobs["baseline"])) == [["E", "F", "A"]]
    assert ablation_groups(finished, knobs["search"]) == []

    tables = build_tables(finished, pass_k=3)
    assert set(tables) == {
        "table1",
        "ablation_granularity",
        "ablation_judge_prompt",
        "ablation_judge_mode",
        "ablation_ratio",
        "ablation_baseline",
    }
    markdown, csv_text, *_ = tables["ablation_baseline"]
    assert markdown.splitlines()[0] == (
        "| Group | Student | Baseline | Mean prefix ratio | Retention % | Avg Pass@1 | "
        "Avg Pass@3 | Δ Avg Pass@1 | Δ Avg Pass@3 | Cells (problems×samples) | Run |"
    )
    body = [
        [c.strip() for c in line.strip("|").split("|")] for line in markdown.split("\n\n")[0].strip().splitlines()[2:]
    ]
    # no recipe and no report.ablation_reference: the first arm is the reference; no graded predictions: no pairs
    assert body == [
        ["1", STUDENT, "prefix_only", "0.41", "–", "52.00", "62.00", "ref", "ref", "MATH500 500×3 (4096 tok)", "E"],
        ["1", STUDENT, "student_only", "–", "70.0", "50.00", "60.00", "–", "–", "MATH500 500×3 (4096 tok)", "F"],
        ["1", STUDENT, "palign", "0.41", "60.0", "60.00", "70.00", "–", "–", "MATH500 500×3 (4096 tok)", "A"],
    ]
    assert "group 1: prefix_only (the first arm" in markdown
    assert (
        csv_text.splitlines()[2]
        == f"1,{STUDENT},student_only,,70.0,50.00,,,,60.00,,,,,,,,,,,,MATH500 500×3 (4096 tok),F"
    )
    ratio_rows = [line.split(",") for line in tables["ablation_ratio"].csv.strip().splitlines()]
    assert ratio_rows[0][:5] == ["Group", "Student", "Baseline", "Ratio", "Mean prefix ratio"]
    avg = [ratio_rows[0].index("Avg Pass@1"), ratio_rows[0].index("Avg Pass@3")]
    assert [[*r[3:6], *(r[i] for i in avg)] for r in ratio_rows[1:]] == [
        ["0.25", "0.26", "40.0", "55.00", "65.00"],
        ["0.5", "0.51", "50.0", "54.50", "64.50"],
    ]
    granularity_rows = [line.split(",") for line in tables["ablation_granularity"].csv.strip().splitlines()[1:]]
    assert [(r[0], r[3], r[-1]) for r in granularity_rows] == [
        ("1", "paper_sentence", "A"),
        ("1", "step", "B"),
        ("2", "paper_sentence", "C"),
        ("2", "step", "D"),
    ]
    # Table 1 names each palign run by where it departs from the most common setting
    labels = {row[1] for row in md_rows(tables["table1"].markdown)}
    assert {
        "palign",
        "palign (granularity=step)",
        "palign (judge_prompt=answer_reachable)",
        "palign (granularity=step, judge_prompt=answer_reachable)",
        "palign (judge_mode=generate)",
        "palign (training.learning_rate=2e-05)",
    } <= labels


def truncation_row(ident: str, m: int, chosen_k: int, probes: list[tuple[int, bool, float | None]]) -> dict:
    return {
        "key": f"{ident}:0",
        "id": ident,
        "question": "q",
        "answer": "1",
        "granularity": "sentence",
        "units": [f"unit {i}. " for i in range(m)],
        "m": m,
        "chosen_k": chosen_k,
        "prefix_ratio": chosen_k / m,
        "prefix": "",
        "prefix_tokens": chosen_k * 10,
        "full_tokens": m * 10,
        "fallback": False,
        "monotone": None,
        "full_score": 1.0,
        "threshold": 0.5,
        "judge_calls": len(probes),
        "probes": [{"k": k, "sufficient": s, "score": score, "reply": None} for k, s, score in probes],
    }


def write_records(cache: Path, folder: str, rows: list[dict]) -> None:
    path = cache / "truncation" / folder / "records.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def assert_png(path) -> None:
    assert path is not None and Path(path).stat().st_size > 1000
    assert Path(path).read_bytes()[:8] == PNG_MAGIC


def test_figures_are_written_from_relocated_truncation_artifacts(tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    # The summaries point at a cache that moved; the records are found under <runs>/../cache.
    write_run(
        runs,
        "adaptive",
        "palign",
        {"math500": 60.0},
        prefix_ratio=0.3,
        retention=0.5,
        response_tokens=8000,
        artifact="/elsewhere/cache/truncation/binary-sentence-1",
    )
    write_run(
        runs,
        "fixed",
        "fixed_ratio",
        {"math500": 55.0},
        prefix_ratio=0.5,
        retention=0.5,
        response_tokens=12000,
        artifact="/elsewhere/cache/truncation/fixed_ratio-sentence-2",
    )
    write_run(runs, "long", "sft_long_cot", {"math500": 50.0}, response_tokens=30000)
    write_records(
        cache,
        "binary-sentence-1",
        [
            truncation_row("p1", 10, 3, [(5, True, 0.9), (3, True, 0.6), (2, False, 0.2)]),
            truncation_row("p2", 8, 4, [(4, True, 0.7), (2, False, 0.1), (3, False, 0.3)]),
            truncation_row("p3", 1, 1, []),  # one unit: nothing to search
        ],
    )
    write_records(cache, "fixed_ratio-sentence-2", [truncation_row(f"p{i}", 10, 5, []) for i in range(3)])
    finished, _ = collect_local_runs(runs)

    by_config = truncation_rows_by_config(finished)
    assert sorted(by_config) == [
        f"binary · paper_sentence · judge {STUDENT}/logits/paper",
        "fixed_ratio 0.5 · paper_sentence",
    ]
    assert_png(plot_prefix_ratios(finished, tmp_path / "fig" / "ratios.png"))
    assert_png(
        plot_sufficiency_curves(
            by_config[f"binary · paper_sentence · judge {STUDENT}/logits/paper"], tmp_path / "fig" / "curves.png"
        )
    )
    assert_png(plot_accuracy_vs_length(finished, tmp_path / "fig" / "length.png"))

    # Missing data: skipped, no file.
    unscored = [truncation_row("g", 6, 2, [(3, True, None), (2, True, None), (1, False, None)])]  # generate-mode judge
    assert plot_sufficiency_curves(unscored, tmp_path / "fig" / "none.png") is None
    no_truncation = [r for r in finished if r.name == "long"]
    assert plot_prefix_ratios(no_truncation, tmp_path / "fig" / "none.png") is None
    (runs / "long" / "summary.json").write_text(
        json.dumps({"eval": json.loads((runs / "long" / "summary.json").read_text())["eval"]})
    )
    without_data = [r for r in collect_local_runs(runs)[0] if r.name == "long"]
    assert plot_accuracy_vs_length(without_data, tmp_path / "fig" / "none.png") is None
    assert not (tmp_path / "fig" / "none.png").exists()


def _make_table_module():
    """experiments/ is not an installed package: import it from the repository root, as `python -m` does."""
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    return importlib.import_module("experiments.make_table")


class RecordingTracker:
    """The part of `palign.tracking.Tracker` the report uses, as a W&B tracker."""

    kind = "wandb"

    def __init__(self):
        self.tables, self.logged = {}, {}
        self.logger = SimpleNamespace(experiment=SimpleNamespace(log=self.logged.update))

    def log_table(self, key, columns, rows):
        self.tables[key] = (list(columns), [list(r) for r in rows])


def test_make_report_writes_tables_figures_and_logs_them(tmp_path):
    runs = tmp_path / "runs"
    write_run(
        runs,
        "A",
        "palign",
        {"math500": 60.0},
        prefix_ratio=0.4,
        retention=0.6,
        response_tokens=8000,
        artifact=str(tmp_path / "cache" / "truncation" / "t"),
    )
    write_run(
        runs,
        "B",
        "palign",
        {"math500": 58.0},
        set_={"truncation.granularity._target_": "palign.truncation.units.Steps"},
        response_tokens=9000,
    )
    write_records(
        tmp_path / "cache", "t", [truncation_row("p1", 10, 3, [(5, True, 0.9), (3, True, 0.6), (2, False, 0.2)])]
    )
    tracker = RecordingTracker()

    result = _make_table_module().make_report(runs, tmp_path / "report", Report(pass_k=3), tracker=tracker)
    report = tmp_path / "report"
    assert sorted(p.name for p in report.iterdir()) == [
        "ablation_granularity.csv",
        "ablation_granularity.md",
        "accuracy_vs_length.png",
        "prefix_ratios.png",
        "report.md",
        "sufficiency_curves.png",
        "table1.csv",
        "table1.md",
    ]
    for name in ("accuracy_vs_length", "prefix_ratios", "sufficiency_curves"):
        assert_png(result["plots"][name])
    assert (report / "table1.md").read_text() == result["table1"]
    columns, rows = tracker.tables["report/table1"]
    assert columns[:3] == ["Student", "Method", "MATH500 Pass@1"]  # only evaluated benchmarks get columns
    assert [r[1] for r in rows] == ["palign (granularity=paper_sentence)", "palign (granularity=step)"]
    assert "report/ablation_granularity" in tracker.tables
    assert sorted(tracker.logged) == ["report/accuracy_vs_length", "report/prefix_ratios", "report/sufficiency_curves"]

    with pytest.raises(ValueError, match="no evaluated run"):
        _make_table_module().make_report(tmp_path / "report", tmp_path / "empty")


def test_wandb_summary_becomes_the_local_schema():
    flat = {
        "eval/math500/pass@1": {"last": 40.0},
        "eval/math500/pass@3": 60.0,
        "eval/math500/num_problems": 500,
        "eval/math500/num_samples": 3,
        "eval/avg_pass@1": 40.0,
        "truncation/prefix_ratio_mean": 0.25,
        "truncation/examples": 40,
        "alignment/retention": 0.5,
        "alignment/examples": 40,
        "train/loss": 1.2,
        "eval/math500/predictions": {"_type": "table-file", "path": "x"},
    }
    summary = summary_from_wandb(flat)
    assert summary == {
        "eval": {
            "benchmarks": {"math500": {"pass@1": 40.0, "pass@3": 60.0, "num_problems": 500, "num_samples": 3}},
            "avg_pass@1": 40.0,
        },
        "truncation": {"prefix_ratio_mean": 0.25, "examples": 40},
        "alignment": {"retention": 0.5, "examples": 40},
    }
    run = RunRecord("r", base_config() | {"baseline": BASELINES["palign"]}, summary, "https://wandb.ai/x/palign/runs/r")
    assert md_rows(build_tables([run])["table1"].markdown)[(STUDENT, "palign")][-4:] == [
        "40.00",
        "60.00",
        "40.00",
        "60.00",
    ]
    assert run.truncation_records() is None


# ---------------------------------------------------------------------------------------------
# Two real run folders, produced now in the test's own folder (about 2 minutes):
# `python run.py experiment=tiny logger=none baseline=palign` and `baseline=fixed_ratio baseline.prefix.ratio=0.25`.


def _real_run(runs_dir: Path, baseline: str) -> Path:
    (folder,) = [
        f
        for f in sorted(runs_dir.glob(f"tiny_random-{baseline}-champ-*"))
        if "eval" in json.loads((f / "summary.json").read_text())
    ]
    return folder


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("real")
    run_cli(["experiment=tiny", "logger=none", "baseline=palign"], out)
    run_cli(["experiment=tiny", "logger=none", "baseline=fixed_ratio", "baseline.prefix.ratio=0.25"], out)
    return {b: _real_run(out / "runs", b) for b in ("palign", "fixed_ratio")}


@pytest.mark.slow
def test_report_on_two_real_runs(real_runs, tmp_path):
    runs = tmp_path / "runs"
    for folder in real_runs.values():
        (runs / folder.name).mkdir(parents=True)
        for name in ("summary.json", "config.yaml"):
            shutil.copy(folder / name, runs / folder.name / name)
        artifact = Path(json.loads((folder / "summary.json").read_text())["truncation"]["artifact"])
        (tmp_path / "cache" / "truncation" / artifact.name).mkdir(parents=True)
        shutil.copy(artifact / "records.jsonl", tmp_path / "cache" / "truncation" / artifact.name / "records.jsonl")
    summaries = {b: json.loads((f / "summary.json").read_text()) for b, f in real_runs.items()}
    (benchmark,) = summaries["palign"]["eval"]["benchmarks"]  # experiment=tiny evaluates one benchmark
    assert benchmark == "champ_heldout"

    result = _make_table_module().make_report(runs, tmp_path / "report", Report(pass_k=2))
    rows = md_rows(result["table1"])
    assert list(rows) == [("tiny_random", "fixed_ratio"), ("tiny_random", "palign")]
    for baseline, summary in summaries.items():
        scores = summary["eval"]["benchmarks"][benchmark]
        # each value with the interval the evaluation computed from the same graded predictions
        expected = [
            f"{scores[m]:.2f} [{scores[m + '_ci_low']:.1f}, {scores[m + '_ci_high']:.1f}]" for m in ("pass@1", "pass@2")
        ]
        assert rows[("tiny_random", baseline)][:2] == expected
        avg = [
            f"{summary['eval'][f'avg_{m}']:.2f} [{summary['eval'][f'avg_{m}_ci_low']:.1f}, "
            f"{summary['eval'][f'avg_{m}_ci_high']:.1f}]"
            for m in ("pass@1", "pass@2")
        ]
        assert rows[("tiny_random", baseline)][2:] == avg  # one benchmark: Avg is its cell, with its interval
    samples = md_rows(section(result["table1"], f"| Student | Method | {benchmark.upper()} | Run |"))
    assert samples[("tiny_random", "palign")][0] == "2×2 (8 tok)"
    assert result["unfinished"] == [] and list(result["tables"]) == ["table1"]  # two baselines, no single-knob pair
    # no sft_long_cot run: no reference row, no differences, no forest plot
    assert result["plots"].pop("forest_table1") is None
    for path in result["plots"].values():
        assert_png(path)
    finished, _ = collect_local_runs(runs)
    by_config = truncation_rows_by_config(finished)
    assert sorted(len(rows) for rows in by_config.values()) == sorted(
        [summaries["fixed_ratio"]["truncation"]["examples"], summaries["palign"]["truncation"]["examples"]]
    )
    assert any(label.startswith("fixed_ratio 0.25 · ") for label in by_config)
