"""Fail before the expensive part (palign/preflight.py): everything a config names that can be checked
without a model is refused before any model loads and before the run folder is written, every
problem at once; a multirun checks every job before it launches the first."""

from __future__ import annotations

import json

import pytest

import palign.llm.models as models
from palign.pipeline import run
from palign.preflight import preflight
from palign.schema import ConfigError
from tests.conftest import compose_config, run_cli


@pytest.fixture
def forbid_model_loads(monkeypatch):
    """Call it once the config is composed: from then on loading or building any model fails the
    test (preflight must refuse first)."""

    def forbid():
        for name in ("load_tokenizer", "load_model", "load_inference_model", "resolve_model_path"):
            monkeypatch.setattr(
                models, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} called before the refusal")
            )

    return forbid


def test_every_problem_is_reported_at_once_before_a_model_loads_or_the_run_folder_is_written(
    tmp_path, forbid_model_loads
):
    cfg = compose_config(
        [
            "student=tiny_random",
            "logger=none",
            "teacher=jsonl",
            f"teacher.source.path={tmp_path}/gone.jsonl",
            "evaluation=paper",
            f"evaluation.benchmarks.aime24.local_path={tmp_path}/aime24.jsonl",
            "trainer.devices=0",
            "trainer.precision=bf17",
            "trainer.strategy=ddp_spawn",
            "evaluation.model_path=" + str(tmp_path / "no-student"),
        ],
        tmp_path,
    )
    forbid_model_loads()
    with pytest.raises(ConfigError) as refused:
        run(cfg)
    message = str(refused.value)
    assert message.startswith("this run would fail; nothing was loaded or written:")
    for expected in (
        f"teacher.source.path={tmp_path}/gone.jsonl: does not exist",
        f"evaluation.benchmarks.aime24.local_path={tmp_path}/aime24.jsonl: does not exist",
        "trainer.devices=0: a count >= 1",
        "trainer.precision=bf17: Lightning knows",
        "trainer.strategy=ddp_spawn: its processes' training state does not come back",
        f"evaluation.model_path={tmp_path / 'no-student'}: no model folder",
    ):
        assert expected in message, message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "overrides,expected",
    [
        # a `_target_` part of stage 1 is built as the stage builds it: a wrong option is refused naming its key
        (
            ["+truncation.granularity.chunk_tokens=3"],
            "truncation.granularity: TypeError: Sentences.__init__() got an unexpected keyword argument 'chunk_tokens'",
        ),
        (
            ["truncation.search._target_=palign.truncation.search.TernaryPrefixSearch"],
            "truncation.search: ImportError: Error loading 'palign.truncation.search",
        ),
        (
            ["truncation/judge/threshold=quantile", "truncation.judge.threshold.value=1.5"],
            "truncation.judge.threshold: ValueError: truncation.judge.threshold.value: "
            "a quantile is in [0, 1], got 1.5",
        ),
        (
            ["baseline=fixed_ratio", "baseline.prefix.ratio=0"],
            "baseline.prefix: ValueError: baseline.prefix.ratio: the share of units kept is a number in (0, 1], got 0",
        ),
        # a target the baseline does not make the inputs of
        (
            ["baseline=sft_long_cot", "baseline.target=prefix_only"],
            "baseline.target=prefix_only is built from teacher prefixes, but baseline.prefix (NoPrefix) makes none",
        ),
        (
            ["baseline=palign", "baseline.alignment=false"],
            "baseline.target=prefix_continuation is built from the student's "
            "continuations, but baseline.alignment=false",
        ),
        (
            ["baseline.prefix._target_=palign.truncation.prefixes.JudgedPrefix"],
            "baseline.prefix._target_=palign.truncation.prefixes.JudgedPrefix: no such class",
        ),
    ],
)
def test_a_baseline_or_a_part_of_stage_1_that_cannot_be_built_is_refused_before_a_model_loads(
    overrides, expected, tmp_path, forbid_model_loads
):
    cfg = compose_config(["student=tiny_random", "logger=none", *overrides], tmp_path)
    forbid_model_loads()
    with pytest.raises(ConfigError, match="this run would fail; nothing was loaded or written") as refused:
        run(cfg)
    assert expected in str(refused.value), str(refused.value)
    assert not (tmp_path / "runs").exists()


def test_the_batch_arithmetic_uses_the_world_size_lightning_resolves(tmp_path, forbid_model_loads):
    # 2 CPU processes x micro-batch 4 cannot make an optimizer step of 12 examples
    cfg = compose_config(
        [
            "student=tiny_random",
            "logger=none",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "data.micro_batch_size=4",
            "training.effective_batch_size=12",
        ],
        tmp_path,
    )
    forbid_model_loads()
    with pytest.raises(
        ConfigError,
        match=r"training.effective_batch_size=12 is not a multiple of data.micro_batch_size=4 "
        r"x 2 processes .* use e.g. 8 or 16",
    ):
        run(cfg)
    assert not (tmp_path / "runs").exists()
    preflight(
        compose_config(
            [
                "student=tiny_random",
                "trainer.devices=2",
                "trainer.strategy=ddp",
                "data.micro_batch_size=4",
                "training.effective_batch_size=16",
            ],
            tmp_path,
        )
    )  # 2 steps of accumulation: fine


def test_lightning_refuses_the_hardware_on_the_jobs_machine_not_on_a_submission_host(tmp_path):
    cfg = compose_config(["student=tiny_random", "trainer=gpu"], tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"trainer \(accelerator=gpu, devices=1.*Lightning refuses it: "
        r"MisconfigurationException",
    ):
        preflight(cfg)  # this machine has no GPU
    preflight(cfg, hardware=False)  # a SLURM login node without GPUs submits it: its node checks again


def test_the_stages_a_run_skips_are_not_checked(tmp_path):
    # stage=eval reads the teacher only for the training problems a benchmark holds out; stage=grade loads no model
    eval_only = [
        "student=tiny_random",
        "stage=eval",
        "teacher=jsonl",
        f"teacher.source.path={tmp_path}/gone.jsonl",
        "trainer.precision=bf17",
    ]
    with pytest.raises(ConfigError, match=r"teacher\.source\.path=.*gone\.jsonl: does not exist") as refused:
        preflight(compose_config(eval_only, tmp_path))  # the demo's CHAMP benchmark leaves out the training problems
    assert "trainer.precision" not in str(refused.value)
    preflight(compose_config([*eval_only, "evaluation.benchmarks.champ_heldout.exclude_training=false"], tmp_path))
    graded = tmp_path / "p.jsonl"
    graded.write_text(json.dumps({"answer": "2", "output": ["2"]}) + "\n")
    preflight(
        compose_config(
            ["stage=grade", f"predictions={graded}", "student.source=local", f"student.pretrained={tmp_path}/nothing"],
            tmp_path,
        )
    )
    with pytest.raises(ConfigError, match=r"predictions=.*/nope.jsonl: does not exist"):
        preflight(compose_config(["stage=grade", f"predictions={tmp_path}/nope.jsonl"], tmp_path))


def test_models_are_found_without_loading_them(tmp_path):
    missing = compose_config(["student.source=local", f"student.pretrained={tmp_path}/student", "stage=eval"], tmp_path)
    with pytest.raises(ConfigError, match=rf"student: model '.*': the folder {tmp_path}/student does not exist"):
        preflight(missing)
    tiny = compose_config(
        ["student=tiny_random", "student.tokenizer_from.package=not_a_package", "stage=eval"], tmp_path
    )
    with pytest.raises(ConfigError, match=r"student: its tokenizer_from: package 'not_a_package' is not installed"):
        preflight(tiny)
    # a tokenizer folder (the GPU acceptance run's) holds a tokenizer, not a model
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    local = ["student=tiny_random_local_tokenizer", f"student.tokenizer_from.pretrained={folder}", "stage=eval"]
    with pytest.raises(
        ConfigError,
        match=rf"its tokenizer_from: .*the folder {folder} has no tokenizer.json or "
        "tokenizer_config.json; point `pretrained` at a saved tokenizer folder",
    ):
        preflight(compose_config(local, tmp_path))
    (folder / "tokenizer.json").write_text("{}")
    preflight(compose_config(local, tmp_path))


@pytest.mark.slow
def test_a_multirun_with_one_bad_job_launches_none(tmp_path):
    proc = run_cli(
        ["-m", "student=tiny_random", "logger=none", "data.micro_batch_size=2", "training.effective_batch_size=4,3"],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "1 of 2 jobs of this sweep would fail, so none was launched" in err, err[-3000:]
    assert "student=tiny_random logger=none data.micro_batch_size=2 training.effective_batch_size=3):" in err
    assert "job #1 (" in err
    assert "training.effective_batch_size=3 is not a multiple of data.micro_batch_size=2" in err
    assert "job #0" not in err  # the sound job is not listed
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("multirun/*/*/jobs.jsonl"))


@pytest.mark.slow
def test_a_slurm_array_is_checked_before_sbatch_is_called(tmp_path):
    # no sbatch on this machine: a submission would fail on the missing command; the preflight refuses first
    proc = run_cli(
        [
            "-m",
            "hydra/launcher=slurm",
            "~local@hydra.launcher",
            "student=tiny_random",
            "logger=none",
            "trainer=gpu",
            "trainer.devices=2",
            "data.micro_batch_size=1",
            "training.effective_batch_size=4,3",
            "teacher=jsonl",
            f"teacher.source.path={tmp_path}/gone.jsonl",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "2 of 2 jobs of this sweep would fail, so none was launched" in err, err[-3000:]
    assert f"teacher.source.path={tmp_path}/gone.jsonl: does not exist" in err
    assert "training.effective_batch_size=3 is not a multiple of data.micro_batch_size=1 x 2 processes" in err
    # the GPUs are the job's node's to check: a login node without them submits the job
    assert "Lightning refuses" not in err
    assert "sbatch" not in err.lower().replace("sbatch script", "")
