"""Configs are checked against the schema (palign/schema.py) while Hydra composes them: an unknown
key or a wrong type anywhere (command line or YAML) fails naming the full key, before any model
loads and before a run folder is written; values out of range are refused by `check_values` before
the run starts; a setting the baseline ignores is refused."""

from __future__ import annotations

import re
import textwrap

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from palign.pipeline import run
from palign.schema import ConfigError, check_values
from tests.conftest import PROJECT_ROOT, compose_config, run_cli

WRONG_TYPE = [
    "data.max_length=abc",
    "training.learning_rate=fast",
    "training.epochs=[1]",
    "truncation.judge.batch_size=many",
    "evaluation.sampling.top_k=off",
]


@pytest.mark.parametrize("override", WRONG_TYPE)
def test_a_wrong_type_fails_while_composing_naming_the_key(override, tmp_path):
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config([override], tmp_path)
    assert f"full_key: {override.split('=')[0]}" in str(caught.value.__cause__)  # OmegaConf's error, with the full key
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override",
    [
        "data.max_lenght=512",
        "truncation.judge.treshold.value=5",
        "traning.epochs=1",
        "teacher.source.modle=GPT-4",
        "trainer.precison=32-true",
    ],
)
def test_an_unknown_key_on_the_command_line_fails_while_composing(override, tmp_path):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].replace(".", r"\.")):
        compose_config([override], tmp_path)


RANGE = [
    ("data.micro_batch_size=0", "data.micro_batch_size=0: must be an integer >= 1"),
    ("data.micro_batch_size=-2", "data.micro_batch_size=-2: must be an integer >= 1"),
    ("training.effective_batch_size=0", "training.effective_batch_size=0: must be an integer >= 1"),
    ("evaluation.sampling.num_samples=0", "evaluation.sampling.num_samples=0: must be an integer >= 1"),
    ("evaluation.pass_k=4", "evaluation.pass_k=4: must be at most evaluation.sampling.num_samples=3"),
    ("training.warmup_ratio=1.5", "training.warmup_ratio=1.5: must be a number in [0, 1]"),
    ("alignment.sampling.top_p=0", "alignment.sampling.top_p=0.0: must be a number in (0, 1]"),
    ("data.train_limit=0", "data.train_limit=0: must be null (all) or an integer >= 1"),
    ("truncation.judge.mode=vote", "truncation.judge.mode='vote': must be one of ['logits', 'generate']"),
    ("evaluation.benchmarks.champ_heldout.limit=0", "evaluation.benchmarks.champ_heldout.limit=0: must be null"),
    ("teacher.source.limit=-1", "teacher.source.limit=-1: must be null (all) or an integer >= 1"),
]


@pytest.mark.parametrize(("override", "message"), RANGE, ids=[r[0] for r in RANGE])
def test_a_value_out_of_range_is_refused_before_the_run_folder_exists(override, message, tmp_path):
    cfg = compose_config(["student=tiny_random", "logger=none", override], tmp_path)
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    assert message in str(caught.value)
    assert not (tmp_path / "runs").exists()


def test_every_bad_value_is_named_at_once(tmp_path):
    cfg = compose_config(["data.micro_batch_size=0", "training.learning_rate=-1"], tmp_path)
    with pytest.raises(ConfigError, match=r"(?s)data\.micro_batch_size.*training\.learning_rate"):
        check_values(cfg)


def test_a_key_added_with_plus_to_a_typed_node_is_refused(tmp_path):
    cfg = compose_config(["+data.shuffle_buffer=5"], tmp_path)
    with pytest.raises(ConfigError, match="shuffle_buffer"):
        check_values(cfg)
    check_values(
        compose_config(["+callbacks.swa._target_=pytorch_lightning.callbacks.StochasticWeightAveraging"], tmp_path)
    )


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["experiment=paper/table1_qwen2_5_7b"],
        ["experiment=paper/table1_qwen3_8b"],
        ["experiment=tiny"],
        ["debug=fast"],
        ["experiment=paper/table1_qwen2_5_7b", "debug=fast"],
        ["teacher=generate"],
        ["teacher=generate_remote"],
        ["teacher=jsonl"],
        ["teacher=s1k"],
        ["baseline=fixed_ratio"],
        ["chain_judge=openai"],
        ["evaluation=none"],
        ["training=paper"],
        ["trainer=ddp"],
        ["trainer=fsdp"],
        ["truncation/judge=qwen2_5_7b_instruct"],
        ["truncation/judge=smollm2_135m"],
        ["truncation/granularity=token_chunk"],
    ],
    ids=str,
)
def test_the_shipped_configs_pass_the_checks(overrides, tmp_path):
    cfg = compose_config(overrides, tmp_path)
    check_values(cfg)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # nothing left unset


def write_experiment(tmp_path, name: str, body: str):
    """An experiment file in a config folder of its own, added to Hydra's search path."""
    folder = tmp_path / "extra_conf" / "experiment"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text("# @package _global_\n" + textwrap.dedent(body), encoding="utf-8")
    return f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]"


def test_a_typo_inside_an_experiment_file_fails_while_composing(tmp_path):
    searchpath = write_experiment(
        tmp_path,
        "typo",
        """
        truncation:
          judge:
            treshold:
              value: 5
        """,
    )
    with pytest.raises(ConfigCompositionException, match=r"truncation\.judge\.treshold"):
        compose_config([searchpath, "experiment=typo"], tmp_path)


@pytest.mark.slow
def test_the_command_line_refuses_a_typo_in_a_yaml_file_and_a_wrong_type_before_loading_anything(tmp_path):
    searchpath = write_experiment(
        tmp_path,
        "typo",
        """
        traning:
          epochs: 1
        """,
    )
    typo = run_cli(["student=tiny_random", "logger=none", searchpath, "experiment=typo"], tmp_path, check=False)
    assert typo.returncode != 0 and "traning" in typo.stderr, typo.stderr[-2000:]
    wrong = run_cli(["student=tiny_random", "logger=none", "data.max_length=abc"], tmp_path, check=False)
    assert wrong.returncode != 0 and "data.max_length" in wrong.stderr and "abc" in wrong.stderr, wrong.stderr[-2000:]
    for proc in (typo, wrong):
        assert "Loading weights" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_setting_the_baseline_ignores_is_refused_at_stage_all_as_at_stage_truncate(tmp_path):
    common = ["student=tiny_random", "logger=none", "baseline=sft_long_cot", "truncation/search=exhaustive"]
    truncate = run_cli([*common, "stage=truncate"], tmp_path, check=False)
    everything = run_cli(common, tmp_path, check=False)
    assert truncate.returncode != 0 and everything.returncode != 0
    assert "baseline 'sft_long_cot' does not truncate; pick e.g. baseline=prefix_only" in truncate.stderr
    assert (
        "truncation/search=exhaustive: this setting would be ignored: baseline 'sft_long_cot' does not truncate; "
        "pick e.g. baseline=prefix_only" in everything.stderr
    )
    assert not (tmp_path / "runs").exists()
    fixed = run_cli(
        ["student=tiny_random", "logger=none", "baseline=fixed_ratio", "truncation.judge.threshold.value=1.0"],
        tmp_path,
        check=False,
    )
    assert fixed.returncode != 0
    assert "truncation.judge.threshold.value=1.0: this setting would be ignored: baseline 'fixed_ratio'" in fixed.stderr


def test_a_smaller_sample_count_takes_pass_at_k_with_it_unless_k_is_set(tmp_path):
    cfg = compose_config(["evaluation.sampling.num_samples=1"], tmp_path)
    check_values(cfg)  # refused while pass_k stayed 3
    assert cfg.evaluation.pass_k == 1
    assert compose_config(["evaluation.sampling.num_samples=5", "evaluation.pass_k=2"], tmp_path).evaluation.pass_k == 2
    with pytest.raises(ConfigError, match=r"evaluation.pass_k=3: must be at most evaluation.sampling.num_samples=2"):
        check_values(compose_config(["evaluation.sampling.num_samples=2", "evaluation.pass_k=3"], tmp_path))


def test_a_benchmark_is_added_to_a_recipe_as_an_option_then_field_by_field(tmp_path):
    cfg = compose_config(
        ["+benchmark@evaluation.benchmarks.aime24=aime24", "evaluation.benchmarks.aime24.limit=2"], tmp_path
    )
    check_values(cfg)
    assert (
        sorted(cfg.evaluation.benchmarks) == ["aime24", "champ_heldout"] and cfg.evaluation.benchmarks.aime24.limit == 2
    )


@pytest.mark.parametrize(
    "argument,now",
    [
        ("baseline.ratio=0.25", "baseline.prefix.ratio=0.25 (baseline=fixed_ratio)"),
        ("truncation.search.chunk_size=4", "truncation.chunk_size=4"),
        ("truncation.judge.threshold.kind=quantile", "truncation/judge/threshold=quantile"),
        ("truncation.granularity.options.chunk_tokens=32", "truncation.granularity.chunk_tokens=32"),
        ("chain_judge.remote.model=glm-4.5", "chain_judge.backend.model=glm-4.5"),
        ("alignment.ray.num_workers=4", "ray.num_workers=4"),
        ("teacher.source.vllm.max_model_len=4096", "vllm.max_model_len=4096"),
    ],
)
def test_a_setting_that_moved_is_refused_with_its_new_way(argument, now):
    entry = run_py()
    with pytest.raises(SystemExit, match=re.escape(f"{argument}: this setting moved; give it as {now}")):
        entry.refuse_unmergeable_overrides(["logger=none", argument])
    entry.refuse_unmergeable_overrides(["logger=none", now.split(" ")[0]])  # the new way passes


def run_py():
    """run.py as a module (what it does to the command line before Hydra)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("palign_run_py", PROJECT_ROOT / "run.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    return entry


def test_a_stage_s_back_end_is_chosen_by_name_as_an_option_of_the_backend_group(tmp_path):
    from hydra.utils import instantiate

    from palign.llm.ray_backend import RayBackend
    from palign.llm.vllm_backend import VLLMBackend

    given = [
        "alignment.backend=vllm",
        "evaluation.backend=hf,ray",
        "backend@truncation.judge.backend=ray",
        "teacher.source.backend=vllm",
        "chain_judge.backend=openai",
        "alignment.backend.base_url=x",
        "logger=none",
    ]
    assert run_py().backend_choices(given) == [
        "backend@alignment.backend=vllm",
        "backend@evaluation.backend=hf,ray",
        "backend@truncation.judge.backend=ray",
        "backend@teacher.source.backend=vllm",
        "backend@chain_judge.backend=openai",
        "alignment.backend.base_url=x",
        "logger=none",
    ]
    cfg = compose_config(
        run_py().backend_choices(
            ["alignment.backend=vllm", "truncation.judge.backend=ray", "vllm.max_model_len=2048", "ray.num_workers=3"]
        ),
        tmp_path,
    )
    vllm, ray = instantiate(cfg.alignment.backend), instantiate(cfg.truncation.judge.backend)
    assert isinstance(vllm, VLLMBackend) and vllm.engine["max_model_len"] == 2048  # the run's one `vllm:` block
    assert isinstance(ray, RayBackend) and ray.workers["num_workers"] == 3 and ray.data_parallel
    with pytest.raises(Exception, match="backend"):  # a name that is no option of conf/backend/
        compose_config(run_py().backend_choices(["alignment.backend=sglang"]), tmp_path)


@pytest.mark.slow
def test_a_benchmark_given_as_one_value_is_refused_with_the_way_to_give_it(tmp_path):
    # OmegaConf cannot merge a {...} value into a typed benchmark node: it failed inside itself, nothing else printed
    for prefix in ("", "+"):
        proc = run_cli(
            ["stage=eval", "logger=none", f"{prefix}evaluation.benchmarks.aime24={{name: aime24, local_path: x}}"],
            tmp_path,
            check=False,
        )
        assert proc.returncode == 1
        assert (
            "a benchmark is given as a benchmark option and then field by field, not as one {...} value: "
            "+benchmark@evaluation.benchmarks.aime24=<an option of conf/benchmark/, e.g. aime24> "
            "evaluation.benchmarks.aime24.local_path=PATH"
        ) in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    # a config refused by its values prints its message, not a traceback
    proc = run_cli(
        ["stage=eval", "logger=none", "evaluation.sampling.num_samples=2", "evaluation.pass_k=3"], tmp_path, check=False
    )
    assert proc.returncode == 1 and "evaluation.pass_k=3: must be at most" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
