"""Every option of every config group composes and instantiates (Hydra compose API, offline)."""

from __future__ import annotations

from pathlib import Path

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
    assert cfg.teacher.name == "champ" and cfg.baseline.name == "sft_long_cot"
    assert cfg.logger.kind == "wandb" and cfg.trainer.accelerator == "cpu"


def test_qwen3_disables_thinking_through_the_template(tmp_path):
    cfg = compose_config(["student=qwen3_8b"], tmp_path)
    assert cfg.student.chat_template_kwargs.enable_thinking is False
    assert cfg.student.pretrained == "Qwen/Qwen3-8B"


def test_paper_instruction_has_one_home():
    text = "Please reason step by step, and put your final answer within"
    hits = [p for p in list(PROJECT_ROOT.glob("palign/**/*.py")) + list(CONF.rglob("*.yaml")) if text in p.read_text()]
    assert [str(p.relative_to(PROJECT_ROOT)) for p in hits] == ["conf/prompts/paper.yaml"]
