"""Cached artifacts name the code that wrote them: each caching stage has a CODE_VERSION in its
fingerprint, and this test notices a change to a stage's logic that did not bump it.

`tests/integration/stage_code_versions.json` records, per stage, its CODE_VERSION and a digest of its logic
(the syntax trees of its source files, without comments, docstrings or formatting). When a stage's
logic changes, decide: if what it stores changes, bump CODE_VERSION in its module; either way record
the new state with `python tests/integration/test_stage_versions.py --record`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).with_name("stage_code_versions.json")
GENERATION = [
    "palign/llm/generation.py",
    "palign/llm/chat.py",
    "palign/llm/backends.py",
    "palign/llm/hf_backend.py",
    "palign/llm/openai_backend.py",
    "palign/llm/vllm_backend.py",
]
GRADING = ["palign/grading.py"]
# stage -> (module holding CODE_VERSION, the source files whose logic decides what the stage stores)
STAGES = {
    "truncation": (
        "palign.truncation.prefixes",
        [
            "palign/truncation/stage.py",
            "palign/truncation/prefixes.py",
            "palign/truncation/judge.py",
            "palign/truncation/search.py",
            "palign/truncation/units.py",
            *GENERATION,
        ],
    ),
    "alignment": ("palign.alignment.continuation", ["palign/alignment/continuation.py", *GENERATION, *GRADING]),
    "tokenized": ("palign.data.sft", ["palign/data/sft.py", "palign/llm/chat.py"]),
    "teacher_generation": (
        "palign.teachers.sources",
        ["palign/teachers/sources.py", "palign/teachers/records.py", *GENERATION, *GRADING],
    ),
    "evaluation": (
        "palign.evaluation.harness",
        ["palign/evaluation/harness.py", "palign/evaluation/benchmarks.py", *GENERATION, *GRADING],
    ),
    "chain_judge": ("palign.analysis.chain_judge", ["palign/analysis/chain_judge.py", *GENERATION]),
}


def logic_digest(paths: list[str]) -> str:
    """SHA-256 over the files' syntax trees with docstrings removed: comments and layout do not count."""
    sha = hashlib.sha256()
    for path in paths:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        sha.update(path.encode() + b"\0" + ast.dump(tree, annotate_fields=False).encode() + b"\0")
    return sha.hexdigest()


def current_state() -> dict[str, dict]:
    return {
        stage: {"code_version": importlib.import_module(module).CODE_VERSION, "logic": logic_digest(paths)}
        for stage, (module, paths) in STAGES.items()
    }


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_change_to_a_stage_s_logic_is_recorded_with_its_code_version(stage):
    recorded = json.loads(RECORD.read_text())[stage]
    now = current_state()[stage]
    module, paths = STAGES[stage]
    if now["logic"] != recorded["logic"] and now["code_version"] == recorded["code_version"]:
        pytest.fail(
            f"the logic of stage '{stage}' ({', '.join(paths)}) changed since CODE_VERSION "
            f"{recorded['code_version']} was recorded: if what the stage stores changes, bump CODE_VERSION in "
            f"{module}; then record it with `python tests/integration/test_stage_versions.py --record`"
        )
    assert now == recorded, (
        f"stage '{stage}': record the new CODE_VERSION with `python tests/integration/test_stage_versions.py --record`"
    )


def test_the_code_version_names_the_cache_folders(monkeypatch, tmp_path, smollm2_tokenizer):
    from omegaconf import OmegaConf

    from palign.alignment import continuation
    from palign.data import sft
    from palign.data.sft import SupervisedExample, build_tokenized_split
    from palign.truncation import prefixes
    from palign.truncation import stage as truncation

    settings = continuation.AlignmentSettings(
        model_identity={"name": "m"},
        prompts={},
        sampling={},
        filter="none",
        chunk_size=1,
        grading_workers=1,
        grading_timeout_s=10.0,
        chat_template_kwargs={},
    )
    prompts = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "prompts" / "paper.yaml"))
    examples = [SupervisedExample(id="a", question="1+1?", target="2")]
    from palign.truncation.units import Sentences

    def folders():
        return (
            continuation.PrefixContinuation(settings, tmp_path, lambda: None, smollm2_tokenizer).folder,
            build_tokenized_split(examples, smollm2_tokenizer, prompts, 64, tmp_path, "train").path,
            truncation.PrefixTruncation(
                prefixes.FixedRatioPrefix(ratio=0.5),
                Sentences(),
                tmp_path,
                smollm2_tokenizer,
                chunk_size=32,
                progress=False,
            ).folder,
        )

    before = folders()
    for module in (continuation, sft, prefixes):
        monkeypatch.setattr(module, "CODE_VERSION", module.CODE_VERSION + 1)
    after = folders()
    assert all(b != a for b, a in zip(before, after))


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/integration/test_stage_versions.py --record")
    RECORD.write_text(json.dumps(current_state(), indent=2, sort_keys=True) + "\n")
    print(f"recorded {RECORD}")
