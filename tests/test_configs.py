"""Every option of every config group composes and instantiates (Hydra compose API, offline)."""

from __future__ import annotations

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from conftest import PROJECT_ROOT, compose_config
from palign.llm.models import ModelSpec

CONF = PROJECT_ROOT / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("local", "hydra"))


def options(group: str) -> list[str]:
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


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
    assert {"student", "teacher", "baseline", "trainer", "logger", "experiment"} <= set(GROUPS)
    assert len(ALL) >= 20


@pytest.mark.parametrize("group,option", ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes_and_instantiates(group, option, tmp_path):
    # groups outside the defaults list (e.g. benchmark, read by the evaluation config) are added
    prefix = "" if group in IN_DEFAULTS else "+"
    cfg = compose_config([f"{prefix}{group}={option}"], tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert str(cfg.paths.root) == str(tmp_path)
    ModelSpec.from_config(cfg.student)
    teacher = instantiate(cfg.teacher.source)
    assert hasattr(teacher, "load")
    assert cfg.baseline.target
    trainer_cls = get_class(cfg.trainer._target_)
    if cfg.trainer.accelerator == "cpu":
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert isinstance(trainer, trainer_cls)
    assert cfg.logger.kind in ("wandb", "csv", "none")


def test_default_config_is_the_embedded_demo(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.student.name == "smollm2_135m" and cfg.student.source == "gguf_package"
    assert cfg.teacher.name == "champ" and cfg.baseline.name == "palign"
    assert cfg.logger.kind == "wandb" and cfg.trainer.accelerator == "cpu"


def test_paper_recipes_hold_the_papers_settings(tmp_path):
    for student, hub_id in (("qwen2_5_7b", "Qwen/Qwen2.5-7B-Instruct"), ("qwen3_8b", "Qwen/Qwen3-8B")):
        cfg = compose_config([f"experiment=paper/table1_{student}"], tmp_path)
        assert cfg.student.pretrained == hub_id and cfg.teacher.name == "s1k" and cfg.baseline.name == "palign"
        assert cfg.training.lora == {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
        assert (cfg.training.learning_rate, cfg.training.warmup_ratio, cfg.training.epochs) == (5e-5, 0.1, 3)
        assert cfg.training.effective_batch_size == 32 and cfg.data.max_length == 32768
        assert cfg.granularity.name == "paper_sentence" and cfg.search.name == "binary" and cfg.judge.mode == "generate"
        assert sorted(cfg.evaluation.benchmarks) == ["aime24", "aime25", "amc12", "math500"]
        sampling = cfg.evaluation.sampling
        assert (sampling.num_samples, sampling.temperature, sampling.top_p) == (3, 0.6, 0.9)
        assert cfg.alignment.filter == "correct"


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


def test_run_identity_ignores_how_the_judge_computes_but_not_what(tmp_path):
    from palign.runs import run_identity

    base = run_identity(compose_config([], tmp_path))
    how = ["judge.backend=vllm", "judge.engine=batched", "judge.max_tail_tokens=64", "alignment.backend=vllm"]
    assert run_identity(compose_config(how, tmp_path)) == base
    assert run_identity(compose_config(["judge.mode=generate"], tmp_path)) != base
    assert run_identity(compose_config(["judge.threshold.value=0.5"], tmp_path)) != base
