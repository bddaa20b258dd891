"""Run identity and folders: which config values name a run, and where its folder is.

A run is its readable name plus a fingerprint of its identity: every field of the typed config
(palign/schema.py) that changes its results, less the stages its baseline never runs. The schema
marks the fields that say how rather than what (`identity=False`: back ends, chunk sizes, folders,
loggers), and the fields naming a local file (`content=True`), whose identity is what the file
holds, never where it lies. So the same command on another machine, or with other `paths.*`, finds
a run of the same id, and a change of `trainer.precision` does not. The run (`palign.pipeline`) and
the report (`palign.reporting`, which groups finished runs by what they were run with) read it here.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from palign.artifacts.digests import file_sha256, fingerprint


def target_class(target: str) -> type:
    """The class a `_target_` names, imported by its name as Hydra will: this service (and the report)
    reads what a part's class declares (a prefix policy's `reads`, a splitter's `name`) without
    importing the stage that holds it."""
    import importlib

    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"_target_={target}: no such class ({err})") from None


def prefix_policy(cfg: DictConfig) -> type:
    """The class of the baseline's prefix policy (`baseline.prefix._target_`, palign/truncation/prefixes.py)."""
    try:
        return target_class(cfg.baseline.prefix._target_)
    except ValueError as err:
        raise ValueError(
            f"baseline.prefix.{err}; name a prefix policy of palign/truncation/prefixes.py, e.g. "
            "palign.truncation.prefixes.AdaptivePrefix"
        ) from None


def unused_groups(cfg: DictConfig) -> dict[str, str]:
    """The config nodes (dotted paths) the chosen baseline never reads, each with the reason: they
    neither name the run (`run_identity`) nor may be set on the command line (`check_knobs_used`).
    The baseline's prefix policy says which fields of the `truncation` node it reads (its `reads`)."""
    name = cfg.baseline.name
    policy = prefix_policy(cfg)
    unused = {}
    if not policy.reads:
        unused["truncation"] = f"baseline '{name}' does not truncate; pick e.g. baseline=prefix_only or baseline=palign"
    else:
        for spec in fields(OmegaConf.get_type(cfg.truncation)):
            if spec.name != "_target_" and spec.name not in policy.reads:
                unused[f"truncation.{spec.name}"] = (
                    f"baseline '{name}' ({policy.__name__}) reads no truncation.{spec.name}; pick e.g. baseline=palign"
                )
    if not cfg.baseline.alignment:
        unused["alignment"] = f"baseline '{name}' has no alignment stage; pick e.g. baseline=palign"
    return unused


def unused_reason(cfg: DictConfig, key: str) -> str | None:
    """Why the baseline never reads config key `key` (dotted, or a group path like truncation/search)."""
    key = key.lstrip("+~").split("=", 1)[0].split("@", 1)[0].replace("/", ".")
    for node, reason in unused_groups(cfg).items():
        if key == node or key.startswith(node + "."):
            return reason
    return None


def content_identity(value: Any) -> Any:
    """A local file or folder by what it holds (SHA-256), anything else (a Hub id) as it is."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value)
    if path.is_file():
        return {"sha256": file_sha256(path)}
    if path.is_dir():  # read-only data folders are common: no digest sidecar is written here
        return {"files": {str(p.relative_to(path)): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}}
    return value


def _identity(node: Any, prefix: str, skip: dict[str, str]) -> Any:
    kind = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if kind is not None and is_dataclass(kind):
        out = {}
        for spec in fields(kind):
            key = prefix + spec.name
            if not spec.metadata.get("identity", True) or key in skip:
                continue
            value = None if OmegaConf.is_missing(node, spec.name) else node[spec.name]
            out[spec.name] = (
                content_identity(value) if spec.metadata.get("content") else _identity(value, key + ".", skip)
            )
        return out
    if isinstance(node, DictConfig):
        return {name: _identity(node[name], f"{prefix}{name}.", skip) for name in node}
    if isinstance(node, ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def changes_results(node: Any) -> bool:
    """Whether an extra callback (`callbacks.<name>`) changes what is trained: yes unless its class
    says `changes_results = False` (a profiler, a crash injector), so e.g. SWA names its own run."""
    import importlib

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        return True
    module, _, name = target.rpartition(".")
    return getattr(getattr(importlib.import_module(module), name), "changes_results", True)


def run_identity(cfg: DictConfig, every_stage: bool = False) -> dict[str, Any]:
    """The config values that change a run's results: the typed config less its `identity=False`
    fields and (unless `every_stage`) the stages the baseline skips, files by their content."""
    if not is_dataclass(OmegaConf.get_type(cfg)):
        raise TypeError("run_identity needs a config composed against palign's schema (palign/schema.py)")
    identity = _identity(cfg, "", {} if every_stage else unused_groups(cfg))
    identity["callbacks"] = {
        name: value for name, value in identity.get("callbacks", {}).items() if changes_results(cfg.callbacks[name])
    }
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
