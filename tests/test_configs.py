"""Every option of every config group composes and instantiates (Hydra compose API, offline)."""

from __future__ import annotations

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from palign.llm.models import ModelSpec
from tests.conftest import PROJECT_ROOT, compose_config

CONF = PROJECT_ROOT / "conf"
# every config group, nested ones by their path (truncation/judge), each with its options
# (Hydra's own groups, hydra/launcher included, are tested in tests/integration/test_launchers.py)
GROUPS = sorted(
    {
        str(p.parent.relative_to(CONF)).split("/paper")[0]
        for p in CONF.rglob("*.yaml")
        if p.parent.relative_to(CONF).parts[:1] != ("hydra",)
    }
    - {".", "local"}
)


def options(group: str) -> list[str]:
    """The group's options (experiment/paper/... included), not those of a group inside it
    (truncation/judge/threshold)."""
    root = CONF / group
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.yaml")
        if str(p.parent.relative_to(CONF)).split("/paper")[0] == group
    )


ALL = [(g, o) for g in GROUPS for o in options(g)]


def _groups_in_defaults() -> set[str]:
    defaults = OmegaConf.load(CONF / "config.yaml").defaults
    names = set()
    for entry in defaults:
        if isinstance(entry, str):
            continue
        (key,) = entry.keys()
        names.add(key.replace("optional ", ""))
    return names


IN_DEFAULTS = _groups_in_defaults()


def test_every_group_has_options():
    assert {
        "student",
        "teacher",
        "baseline",
        "trainer",
        "logger",
        "experiment",
        "debug",
        "truncation/granularity",
        "truncation/search",
        "truncation/judge",
        "truncation/judge/threshold",
        "truncation/judge_prompt",
    } <= set(GROUPS)
    assert options("truncation/judge/threshold") == ["absolute", "quantile", "relative_to_full"]
    assert "threshold/absolute" not in options("truncation/judge") and "paper/table1_qwen3_8b" in options("experiment")
    assert len(ALL) >= 20


@pytest.mark.parametrize("group,option", ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes_and_instantiates(group, option, tmp_path):
    # groups outside the defaults list (e.g. benchmark, read by the evaluation config) are added
    if group == "benchmark":  # read by the evaluation config, at evaluation.benchmarks.<name>
        override = f"+benchmark@evaluation.benchmarks.extra_{option}={option}"
    elif group == "backend":  # chosen per stage, at each stage's `backend`
        override = f"backend@alignment.backend={option}"
    else:  # a group chosen inside another group's options (truncation/judge/threshold) is there already
        chosen = group in IN_DEFAULTS or any(group.startswith(f"{outer}/") for outer in IN_DEFAULTS)
        override = f"{'' if chosen else '+'}{group}={option}"
    cfg = compose_config([override], tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert str(cfg.paths.root) == str(tmp_path)
    ModelSpec.from_config(cfg.student)
    teacher = instantiate(cfg.teacher.source)
    assert hasattr(teacher, "load")
    assert cfg.baseline.target
    # the baseline's prefix policy and the `_target_` parts of stage 1 it reads build, as the stage builds them
    from palign.preflight import baseline_problems

    assert baseline_problems(cfg) == []
    trainer_cls = get_class(cfg.trainer._target_)
    if cfg.trainer.accelerator == "cpu":
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert isinstance(trainer, trainer_cls)
    assert cfg.logger.kind in ("wandb", "csv", "none")
    from palign.llm.backends import Backend

    for node in (cfg.truncation.judge.backend, cfg.alignment.backend, cfg.evaluation.backend):
        assert isinstance(instantiate(node), Backend)  # builds nothing heavy: no model, no engine, no Ray


def test_default_config_is_the_embedded_demo(tmp_path):
    cfg = compose_config([], tmp_path, hydra=True)
    assert cfg.student.name == "smollm2_135m" and cfg.student.source == "gguf_package"
    assert cfg.teacher.name == "champ" and cfg.baseline.name == "palign"
    assert cfg.logger.kind == "wandb" and cfg.trainer.accelerator == "cpu"
    assert cfg.hydra.runtime.choices.experiment is None and cfg.hydra.runtime.choices.debug is None


def test_the_default_run_is_what_cfg_job_shows_with_no_experiment(tmp_path):
    """conf/config.yaml's own defaults are the run `python run.py` runs (no experiment is added)."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import NO_LOCAL, cli_env

    paths = [f"paths.root={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    shown = yaml.safe_load(
        subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "run.py"), "--cfg", "job", NO_LOCAL, *paths],
            cwd=PROJECT_ROOT,
            env=cli_env(tmp_path),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    composed = OmegaConf.to_container(compose_config([], tmp_path))
    composed["paths"]["cache_dir"] = str(tmp_path / "cache")
    assert shown == composed


def test_debug_only_shrinks_a_run(tmp_path):
    """debug=fast changes sizes, trainer limits and the logger, never the method."""
    from palign.runs import run_identity

    base = OmegaConf.to_container(compose_config([], tmp_path), resolve=True)
    fast = OmegaConf.to_container(compose_config(["debug=fast"], tmp_path), resolve=True)
    changed = sorted(_diff(base, fast))
    allowed = (
        "teacher.source.limit",
        "data.train_limit",
        "trainer.limit_",
        "logger.",
        "alignment.sampling.max_new_tokens",
        "truncation.judge.max_new_tokens",
        "evaluation.limit",
        "evaluation.sampling.max_new_tokens",
    )
    assert changed and all(key.startswith(allowed) for key in changed), changed
    for name in ("student", "baseline", "prompts", "training"):
        assert fast[name] == base[name], name
    assert run_identity(compose_config(["debug=fast"], tmp_path)) != run_identity(compose_config([], tmp_path))


def _diff(a, b, prefix=""):
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            yield f"{prefix}{key}"


def test_paper_recipes_hold_the_papers_settings(tmp_path):
    for student, hub_id in (("qwen2_5_7b", "Qwen/Qwen2.5-7B-Instruct"), ("qwen3_8b", "Qwen/Qwen3-8B")):
        cfg = compose_config([f"experiment=paper/table1_{student}"], tmp_path)
        assert cfg.student.pretrained == hub_id and cfg.teacher.name == "s1k" and cfg.baseline.name == "palign"
        assert cfg.training.lora == {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
        assert (cfg.training.learning_rate, cfg.training.warmup_ratio, cfg.training.epochs) == (5e-5, 0.1, 3)
        assert cfg.training.effective_batch_size == 32 and cfg.data.max_length == 32768
        truncation = cfg.truncation
        assert cfg.baseline.prefix._target_ == "palign.truncation.prefixes.AdaptivePrefix" and cfg.baseline.alignment
        assert cfg.baseline.target == "prefix_continuation"
        assert truncation.granularity._target_ == "palign.truncation.units.PaperSentences"
        assert truncation.search._target_ == "palign.truncation.search.BinaryPrefixSearch"
        assert truncation.judge.mode == "generate" and truncation.judge_prompt.name == "paper"
        assert sorted(cfg.evaluation.benchmarks) == ["aime24", "aime25", "amc12", "math500"]
        sampling = cfg.evaluation.sampling
        assert (sampling.num_samples, sampling.temperature, sampling.top_p) == (3, 0.6, 0.9)
        assert cfg.alignment.filter == "correct" and cfg.alignment.sampling.max_new_tokens == 32768
        assert cfg.evaluation.sampling.max_new_tokens == 32768 and cfg.teacher.source.only_correct is False


def test_the_qwen3_recipe_inherits_the_qwen2_5_recipe(tmp_path):
    """The two paper recipes differ in the student only: one inherits the other."""
    qwen2 = OmegaConf.to_container(compose_config(["experiment=paper/table1_qwen2_5_7b"], tmp_path), resolve=True)
    qwen3 = OmegaConf.to_container(compose_config(["experiment=paper/table1_qwen3_8b"], tmp_path), resolve=True)
    changed = sorted(_diff(qwen2, qwen3))
    assert changed and all(
        key.startswith(
            ("student.", "truncation.judge.model.", "alignment.model.", "run_name", "group", "chain_judge.model.")
        )
        for key in changed
    ), changed


def test_qwen3_disables_thinking_through_the_template(tmp_path):
    cfg = compose_config(["student=qwen3_8b"], tmp_path)
    assert cfg.student.chat_template_kwargs.enable_thinking is False
    assert cfg.student.pretrained == "Qwen/Qwen3-8B"


def test_paper_instruction_has_one_home():
    text = "Please reason step by step, and put your final answer within"
    hits = [p for p in list(PROJECT_ROOT.glob("palign/**/*.py")) + list(CONF.rglob("*.yaml")) if text in p.read_text()]
    assert [str(p.relative_to(PROJECT_ROOT)) for p in hits] == ["conf/prompts/paper.yaml"]


def test_training_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch, tmp_path):
    import torch

    from palign.config import native_bf16_precision

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert native_bf16_precision("cpu") == "32-true"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16_precision("cpu") == "bf16-mixed"
    assert compose_config(["trainer=cpu"], tmp_path).trainer.precision == "bf16-mixed"
    assert compose_config(["trainer=cpu", "trainer.precision=32-true"], tmp_path).trainer.precision == "32-true"


def test_run_identity_ignores_how_a_stage_computes_but_not_what(tmp_path):
    from palign.runs import run_identity

    base = run_identity(compose_config([], tmp_path))
    how = [
        "backend@truncation.judge.backend=vllm",
        "truncation.judge.engine=batched",
        "truncation.judge.max_tail_tokens=64",
        "backend@alignment.backend=vllm",
        "truncation.chunk_size=3",
        "data.num_workers=2",
        "trainer.devices=2",
        "logger=csv",
        "evaluation.sampling.num_samples=5",
        "training.checkpoint_every_n_steps=7",
    ]
    assert run_identity(compose_config(how, tmp_path)) == base
    crash = [
        "+callbacks.crash._target_=tests.helpers.crash.KillAt",
        "+callbacks.crash.hook=on_train_batch_end",
        "+callbacks.crash.step=1",
    ]
    assert run_identity(compose_config(crash, tmp_path)) == base  # KillAt.changes_results = False
    for what in (
        "truncation.judge.mode=generate",
        "truncation.judge.threshold.value=0.5",
        "trainer.precision=32-true",
        "trainer.gradient_clip_val=0.5",
        "seed=1",
        "data.max_length=512",
        "training=paper",
        "+callbacks.swa._target_=pytorch_lightning.callbacks.StochasticWeightAveraging",
    ):
        assert run_identity(compose_config([what], tmp_path)) != base, what


def test_paths_never_enter_the_run_identity_but_a_teacher_file_s_content_does(tmp_path):
    from palign.runs import run_identity

    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "traces.jsonl").write_text('{"question": "1+1?", "answer": "2", "long_cot": "2"}\n', encoding="utf-8")
    jsonl = ["teacher=jsonl", "teacher.source.id_field=null"]
    here = run_identity(compose_config([*jsonl, f"teacher.source.path={first / 'traces.jsonl'}"], first))
    there = run_identity(
        compose_config(
            [
                *jsonl,
                f"teacher.source.path={second / 'traces.jsonl'}",
                "paths.shared_data=/x",
                f"paths.runs={second}/r",
            ],
            second,
        )
    )
    assert here == there and str(tmp_path) not in str(here)
    (second / "traces.jsonl").write_text('{"question": "2+2?", "answer": "4", "long_cot": "4"}\n', encoding="utf-8")
    changed = run_identity(compose_config([*jsonl, f"teacher.source.path={second / 'traces.jsonl'}"], second))
    assert changed != here
    generate = run_identity(compose_config(["teacher=generate"], first))
    assert generate == run_identity(compose_config(["teacher=generate"], second))  # teacher.source.cache_dir is how


def test_stages_build_themselves_from_their_nodes_without_loading_a_model(tmp_path, smollm2_tokenizer):
    """`truncation`, `alignment` and `data` are _target_ nodes: a setting reaches the stage in one
    hop, a stage the baseline skips is not built, and no judge or model loads while building."""
    from pathlib import Path

    from palign.alignment.continuation import PrefixContinuation
    from palign.pipeline import RunContext, make_alignment, make_datamodule, make_truncation
    from palign.truncation.stage import PrefixTruncation

    def context(overrides):
        cfg = compose_config(["student=tiny_random", *overrides], tmp_path)
        return RunContext(cfg=cfg, run_id="x", run_dir=tmp_path / "run", cache_dir=Path(cfg.paths.cache_dir))

    from palign.llm.models import ModelSpec
    from palign.schema import Judge, JudgePrompt
    from palign.truncation.judge import RelativeToFullThreshold
    from palign.truncation.prefixes import AdaptivePrefix
    from palign.truncation.units import TokenChunks

    ctx = context(
        [
            "truncation/granularity=token_chunk",
            "truncation.granularity.chunk_tokens=7",
            "truncation.judge.max_context_tokens=99",
            "alignment.sampling.temperature=0.3",
        ]
    )
    truncation = make_truncation(ctx, smollm2_tokenizer)
    assert isinstance(truncation, PrefixTruncation) and truncation._judge is None
    # the schema's typed nodes, their `_target_` parts built: no dict rebuilt into a look-alike
    assert truncation.granularity == TokenChunks(chunk_tokens=7) and isinstance(truncation.prefix, AdaptivePrefix)
    assert type(truncation.judge_node) is Judge and type(truncation.judge_prompt) is JudgePrompt
    assert truncation.judge_node.max_context_tokens == 99 and type(truncation.judge_node.model) is ModelSpec
    assert truncation.judge_node.model.name == "tiny_random" and truncation.search(5).strategy == "binary"
    assert truncation.judge_node.threshold == RelativeToFullThreshold(
        value=0.3
    )  # conf/truncation/judge/self_calibrated
    alignment = make_alignment(ctx, smollm2_tokenizer)
    assert isinstance(alignment, PrefixContinuation) and alignment.backend._model is None
    assert alignment.settings.sampling["temperature"] == 0.3
    skipped = context(["baseline=sft_long_cot"])
    assert make_truncation(skipped, smollm2_tokenizer) is None and make_alignment(skipped, smollm2_tokenizer) is None
    data = make_datamodule(context(["data.max_length=333", "baseline=sft_short_cot"]), smollm2_tokenizer)
    assert data.max_length == 333 and data.prefix_stage is None and data.continuation_stage is None


# Schema nodes without a `_target_`, by the palign callables their fields configure (by name) where they are
# used; every other node is read field by field where it is used (ModelSpec and Sampling are the classes
# themselves). A new node must be placed in one of the two, so the test below covers it.
CONFIGURES = {
    "Judge": ("palign.truncation.judge.SufficiencyJudge", "palign.truncation.judge.HFScorer"),
    "Remote": ("palign.llm.openai_backend.OpenAIChatBackend",),
    "Grading": ("palign.grading.GradingPool",),
    "Benchmark": ("palign.evaluation.benchmarks.load_benchmark",),
    "Logger": ("palign.tracking.Tracker",),
}
READ_AS_VALUES = {
    "Config",
    "Paths",
    "Prompts",
    "PrefixMarkers",
    "Baseline",
    "Teacher",
    "TeacherSource",
    "Problems",
    "JudgePrompt",
    "Lora",
    "Intervals",
    "Report",
    "Ray",
    "VLLM",
    "ModelSpec",
    "Sampling",
}


def _own_inits(made) -> list:
    """The palign signatures a class or function brings (a class's own __init__ and its palign bases')."""
    if not isinstance(made, type):
        return [made]
    return [c.__init__ for c in made.__mro__ if "__init__" in vars(c) and c.__module__.startswith("palign")]


def _yaml_targets(node, where: str):
    """(where, `_target_`, the node's other keys) of every palign `_target_` node in a YAML tree."""
    if isinstance(node, dict):
        if str(node.get("_target_", "")).startswith("palign."):
            yield where, node["_target_"], {k for k in node if not (k.startswith("_") and k.endswith("_"))}
        for key, value in node.items():
            yield from _yaml_targets(value, f"{where}:{key}")


def test_no_stage_signature_repeats_a_schema_default():
    """The schema is the one home of each default, checked for every node:
    - a `_target_` node's palign callable (and the classes it inherits from) takes the node's fields without
      defaults of its own, but a default meaning "not given" (None where the schema interpolates the run's block);
    - a node without `_target_` configures the callables CONFIGURES names: a default of theirs for one of the
      node's fields equals the schema's (a class whose default disagrees, as OpenAIChatBackend's concurrency once
      did, fails);
    - every `_target_` part chosen in conf/ (prefix policy, splitter, search, threshold) is a class whose options
      have no defaults: its option's YAML file holds their values.
    Every schema node is a `_target_` node, in CONFIGURES or in READ_AS_VALUES."""
    import dataclasses
    import inspect

    import yaml
    from hydra.utils import get_method

    import palign.schema as schema

    nodes = {
        name: node for name, node in vars(schema).items() if isinstance(node, type) and dataclasses.is_dataclass(node)
    }
    targets = 0
    for name, node in nodes.items():
        fields = {f.name: f for f in dataclasses.fields(node)}
        target = fields["_target_"].default if "_target_" in fields else ""
        if target and not target.startswith("palign."):
            continue  # pytorch_lightning.Trainer
        assert target or name in CONFIGURES or name in READ_AS_VALUES, f"palign/schema.py: {name} is not covered here"
        for made_name in [target] if target else CONFIGURES.get(name, ()):
            targets += bool(target)
            made = get_class(made_name) if made_name.rsplit(".", 1)[-1][0].isupper() else get_method(made_name)
            for function in _own_inits(made):
                for parameter in inspect.signature(function).parameters.values():
                    field = fields.get(parameter.name)
                    if field is None or parameter.default is inspect.Parameter.empty:
                        continue
                    default = (
                        field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
                    )
                    if target:
                        assert parameter.default is None and isinstance(default, str) and "${" in default, (
                            f"{function.__qualname__}({parameter.name}={parameter.default!r}) "
                            f"repeats {name}.{parameter.name}'s default"
                        )
                    else:
                        assert parameter.default == default, (
                            f"{function.__qualname__}({parameter.name}={parameter.default!r}) "
                            "disagrees with the schema's "
                            f"{name}.{parameter.name}={default!r}"
                        )
    assert targets >= 9  # teacher sources, truncation, alignment, data, training, evaluation, chain judge

    parts = 0
    for path in sorted(CONF.rglob("*.yaml")):
        for where, target, options in _yaml_targets(
            yaml.safe_load(path.read_text(encoding="utf-8")), str(path.relative_to(CONF))
        ):
            parts += 1
            made = get_class(target) if target.rsplit(".", 1)[-1][0].isupper() else get_method(target)
            for function in _own_inits(made):
                for parameter in inspect.signature(function).parameters.values():
                    assert parameter.default is inspect.Parameter.empty, (
                        f"{where}: {function.__qualname__}({parameter.name}={parameter.default!r}) "
                        "has a default of its "
                        f"own; its option's YAML file is the home of the value"
                    )
                    assert (
                        parameter.name in options
                        or parameter.name in ("self", "m")
                        or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
                    ), f"{where}: {target} needs {parameter.name}, which the YAML node does not give"
    assert parts >= 16  # 6 baselines' policies, 4 granularities, 3 searches, 3 thresholds


def test_a_data_folder_enters_the_identity_by_what_its_files_hold_and_is_left_untouched(tmp_path):
    from palign.runs import content_identity

    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "part-0.jsonl").write_text("a\n", encoding="utf-8")
    before = content_identity(str(tmp_path / "data"))
    assert before == content_identity(str(tmp_path / "data")) and list((tmp_path / "data").iterdir()) == [
        tmp_path / "data" / "train"
    ]
    (tmp_path / "data" / "train" / "part-0.jsonl").write_text("b\n", encoding="utf-8")
    assert content_identity(str(tmp_path / "data")) != before
    assert content_identity("simplescaling/s1K-1.1") == "simplescaling/s1K-1.1"  # a Hub id stays itself
