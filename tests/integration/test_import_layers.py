"""Imports in palign/ flow one way: the import-linter contracts in pyproject.toml ([tool.importlinter])
hold, and they do catch a violation (on a copy of the package with one import added).

`lint-imports` reads every import, lazy ones inside functions too; run it by hand from the repository
root to see which import breaks which contract.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(),
    reason=f"import-linter is not installed ({LINT_IMPORTS} missing): pip install -e '.[test]'",
)


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the palign package found in `cwd`, with the contracts of `cwd`/pyproject.toml."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def package_copy(tmp_path: Path) -> Path:
    """palign/ and pyproject.toml copied into `tmp_path`, to be linted there.

    palign is a namespace package (no __init__.py), so a bare copy would be merged with the
    installed one and each module read from either; the __init__.py makes the copy a regular
    package, which the import system takes alone.
    """
    shutil.copytree(ROOT / "palign", tmp_path / "palign", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "palign" / "__init__.py").write_text("", encoding="utf-8")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path / "palign"


def test_the_imports_in_palign_follow_the_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "added", "broken"),
    [
        # the circle that palign.runs removed: the report reading the run's identity from the pipeline
        ("reporting/tables.py", "from palign.pipeline import run", "palign.reporting.tables -> palign.pipeline"),
        # a service importing a stage: the vLLM back end holding the judge, as before palign.truncation.vllm_judge
        (
            "llm/vllm_backend.py",
            "from palign.truncation.judge import SufficiencyJudge",
            "palign.llm.vllm_backend -> palign.truncation.judge",
        ),
        # independent siblings: SFT data reaching into stage 2
        (
            "data/sft.py",
            "from palign.alignment.continuation import AlignmentSettings",
            "palign.data.sft -> palign.alignment.continuation",
        ),
        # Hydra outside the run and its config
        ("teachers/sources.py", "from hydra.utils import instantiate", "palign.teachers.sources -> hydra"),
        # inside the artifacts: a strict reader reaching up into the stage stores built on it
        (
            "artifacts/readers.py",
            "from palign.artifacts.stores import RecordStore",
            "palign.artifacts.readers -> palign.artifacts.stores",
        ),
    ],
)
def test_the_contracts_catch_one_lazy_import_that_breaks_them(tmp_path, module, added, broken):
    with open(package_copy(tmp_path) / module, "a", encoding="utf-8") as file:
        file.write(f"\n\ndef _added_for_the_test():\n    {added}  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, f"lint-imports passed with `{added}` in palign/{module}:\n{result.stdout}"
    assert "1 broken" in result.stdout and broken in result.stdout, result.stdout


def test_a_new_top_level_module_must_be_placed_in_a_layer(tmp_path):
    (package_copy(tmp_path) / "unplaced.py").write_text('"""A module no layer names."""\n', encoding="utf-8")
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and "palign.unplaced" in result.stdout, result.stdout
