"""Run identity and folders: which config values name a run, and where its folder is.

A run is its readable name plus a fingerprint of the config keys that change its results
(`run_identity` in conf/config.yaml, less the groups its baseline never reads), so the same command
finds the same folder. The run (`palign.pipeline`) and the report (`palign.reporting`, which groups
finished runs by what they were run with) both read it from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from palign.artifacts import fingerprint

TRUNCATION_KEYS = ("granularity", "search", "judge", "judge_prompt")
ADAPTIVE_ONLY_KEYS = ("search", "judge", "judge_prompt")


def truncation_mode(cfg: DictConfig) -> str:
    """How the baseline gets its prefixes: none, adaptive (judge + search) or fixed_ratio."""
    return cfg.baseline.get("truncation", "none")


def unused_groups(cfg: DictConfig) -> dict[str, str]:
    """The config groups the chosen baseline never reads, each with the reason: they neither name
    the run (`run_identity`) nor may be set on the command line (`palign.pipeline.check_knobs_used`)."""
    mode = truncation_mode(cfg)
    name = cfg.baseline.name
    unused = {}
    if mode == "none":
        unused.update(dict.fromkeys(TRUNCATION_KEYS, f"baseline '{name}' does not truncate; pick e.g. baseline=prefix_only or baseline=palign"))
    elif mode == "fixed_ratio":
        unused.update(dict.fromkeys(ADAPTIVE_ONLY_KEYS, f"baseline '{name}' cuts at a fixed ratio and uses no judge or search; "
                                                        "pick e.g. baseline=palign"))
    if not cfg.baseline.get("alignment", False):
        unused["alignment"] = f"baseline '{name}' has no alignment stage; pick e.g. baseline=palign"
    return unused


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The config values that change a run's results (truncation settings only when used)."""
    skip = unused_groups(cfg)
    identity = {key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig) else cfg[key]
                for key in cfg.run_identity if key in cfg and key not in skip}
    for dotted in cfg.get("run_identity_ignore", []):  # how a stage computes, not what it computes
        *parents, leaf = dotted.split(".")
        node = identity
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return identity


# stages that read other runs' results rather than producing a run of their own
READ_ONLY_STAGES = ("report", "grade")


def run_folder(cfg: DictConfig) -> tuple[str, Path]:
    """(run id, run folder). A stage that reads other runs' results is named after what it reads."""
    if cfg.stage in READ_ONLY_STAGES:
        source = cfg.predictions if cfg.stage == "grade" else cfg.paths.runs
        run_id = f"{cfg.stage}-{fingerprint(str(source), length=8)}"
        return run_id, Path(cfg.paths.root) / cfg.stage / run_id
    run_id = f"{cfg.run_name}-{fingerprint(run_identity(cfg), length=8)}"
    return run_id, Path(cfg.paths.runs) / run_id
