"""Fail before the expensive part: everything a run's config names that can be checked without
loading a model is checked before any model loads and before the run folder is written.

At paper scale a mistake found late costs a 7B model load, hours of truncation and alignment, a
training run, or a SLURM queue wait once per job of an array. So `preflight` collects, for the
stages the run will execute, every problem it can find at once and raises one `ConfigError`
listing them all (each naming its config key, the value and how to fix it):

- the values' own ranges (palign/schema.py: `check_values`), a stage the baseline lacks, and a
  command-line setting the baseline would ignore;
- files and folders: teacher files, benchmark files, the prediction file of `stage=grade`, model
  folders and the GGUF package of the embedded student (`palign.llm.models.model_source_problem`),
  `evaluation.model_path`; Hub ids when the Hub is reachable (`HF_HUB_OFFLINE` unset);
- Lightning's Trainer arguments (accelerator, devices, precision, strategy) and the batch
  arithmetic (the effective batch is a whole number of micro-batches on every process), for the
  stages that train: with `hardware` (on the machine that runs the job) by constructing the
  Trainer as the run will, so Lightning itself refuses what it refuses (a GPU on a CPU machine,
  more devices than there are, a SLURM allocation that does not match); without it (a SLURM
  submission host) only what holds on any machine;
- the GPUs an inference back end needs: vLLM installed and a GPU visible for `backend: vllm`
  (with `hardware`), Ray workers able to hold `vllm.tensor_parallel_size`.

`PreflightSweep`, a Hydra callback (conf/hydra/default.yaml), runs the same checks on every job of
a multirun before the launcher starts the first one, so a sweep or a SLURM array never queues a
job that would fail; the hardware checks run there only when the jobs run on this machine. For a
single run it checks the run before Hydra writes its own output folder (`.hydra/`, the job's log),
so a refused run writes nothing at all under paths.root.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from palign.runs import prefix_policy, unused_reason
from palign.schema import ConfigError, check_values

log = logging.getLogger(__name__)

# stage -> what it runs (the stages a baseline lacks build nothing, `unused_reason`)
TEACHER_STAGES = ("all", "train", "truncate", "align", "judge_chains")
TRAINING_STAGES = ("all", "train")
EVAL_STAGES = ("all", "eval")
# strategies that train in processes they start themselves: what they learn never comes back
SPAWNING = ("spawn", "fork", "notebook")


def preflight(cfg: DictConfig, overrides: Iterable[str] = (), *, hardware: bool = True) -> None:
    """Refuse `cfg` (one run or one job of a sweep) with every problem found, before anything loads.

    overrides: the command line's (or the job's) settings, each checked against the baseline;
    hardware: also check what depends on this machine (Lightning's accelerator and devices, vLLM).
    """
    check_values(cfg)
    try:
        prefix_policy(cfg)  # every check below asks the policy what the baseline reads
    except ValueError as err:
        raise ConfigError(f"this run would fail; nothing was loaded or written:\n  {err}") from None
    problems: list[str] = baseline_problems(cfg) if cfg.stage in TEACHER_STAGES else []
    for stage, node in (("truncate", "truncation"), ("align", "alignment")):
        if cfg.stage == stage and (reason := unused_reason(cfg, node)):
            problems.append(f"stage={stage}: {reason}")
    if cfg.stage in ("all", "train", "truncate", "align"):
        for override in overrides:
            if reason := unused_reason(cfg, override):
                problems.append(f"{override}: this setting would be ignored: {reason}, or drop it")
    problems += file_problems(cfg)
    if cfg.stage in TRAINING_STAGES:
        problems += trainer_problems(cfg, hardware=hardware)
    problems += inference_problems(cfg, hardware=hardware)
    if problems:
        raise ConfigError("this run would fail; nothing was loaded or written:\n  " + "\n  ".join(problems))


# -- the baseline and the parts of stage 1 ---------------------------------------------------------
def baseline_problems(cfg: DictConfig) -> list[str]:
    """The baseline's prefix policy and the `_target_` parts of stage 1 it reads (the splitter, the
    search, the judge's threshold), each built here as the stage builds it, so a wrong option is
    refused naming its key (no model loads); and a target needing prefixes or continuations the
    baseline does not make."""
    from hydra.utils import instantiate

    from palign.data.supervision import CONTINUATION_TARGETS, PREFIX_TARGETS

    problems: list[str] = []

    def built(key: str, make) -> Any:
        try:
            return make(instantiate(OmegaConf.select(cfg, key)))
        except Exception as err:  # noqa: BLE001 (Hydra wraps the class's own error: shown with the key)
            cause = err.__cause__ or err
            problems.append(f"{key}: {type(cause).__name__}: {cause}".replace("\n", " "))
            return None

    baseline, policy = cfg.baseline, prefix_policy(cfg)
    built("baseline.prefix", lambda made: made)
    for key, make in (
        ("truncation.granularity", lambda made: made),
        ("truncation.search", lambda made: made(1)),
        ("truncation.judge.threshold", lambda made: made),
    ):
        if not unused_reason(cfg, key):
            built(key, make)
    if baseline.target in PREFIX_TARGETS and not policy.reads:
        problems.append(
            f"baseline.target={baseline.target} is built from teacher prefixes, but baseline.prefix "
            f"({policy.__name__}) makes none; name a policy that does, e.g. "
            "palign.truncation.prefixes.AdaptivePrefix, or another target"
        )
    if baseline.target in CONTINUATION_TARGETS and not baseline.alignment:
        problems.append(
            f"baseline.target={baseline.target} is built from the student's continuations, but "
            "baseline.alignment=false; set it to true, or pick another target"
        )
    return problems


# -- files, folders and models ----------------------------------------------------------------------
def file_problems(cfg: DictConfig) -> list[str]:
    """Missing files and folders the run's stages would read, and models that cannot be found."""
    problems: list[str] = []
    stage = cfg.stage
    benchmarks = {name: bench for name, bench in (cfg.evaluation.benchmarks or {}).items() if bench is not None}
    needs_teacher = stage in TEACHER_STAGES or (
        stage in EVAL_STAGES and any(b.exclude_training for b in benchmarks.values())
    )
    if needs_teacher:
        problems += teacher_problems(cfg.teacher.source)
    for key, spec in models_used(cfg).items():
        problems += model_problems(spec, key)
    if stage in EVAL_STAGES:
        for name, bench in benchmarks.items():
            key = f"evaluation.benchmarks.{name}"
            if bench.package is not None:
                problems += benchmark_content_problems(bench, key)
                continue
            if bench.local_path is not None:
                missing = _file_problem(
                    bench.local_path,
                    f"{key}.local_path",
                    "a benchmark file (.jsonl or .json)",
                    f"or set it to null to read {bench.hub_id} from the Hub" if bench.hub_id else "",
                )
                problems += missing or benchmark_content_problems(bench, key)
            elif bench.hub_id is None:
                problems.append(
                    f"{key}: neither local_path nor hub_id is set; name the benchmark's file or Hub dataset"
                )
            else:
                problems += hub_problems(bench.hub_id, f"{key}.hub_id", "dataset")
        model_path = cfg.evaluation.model_path
        if model_path is not None and not (Path(model_path) / "config.json").is_file():
            problems.append(
                f"evaluation.model_path={model_path}: no model folder (config.json) there; point it at a "
                "trained student's folder (<run>/student) or drop it to evaluate the run's own"
            )
    if stage == "grade":
        if not cfg.predictions:
            problems.append("stage=grade needs predictions=PATH (JSONL with `answer` and a list of sampled `output`s)")
        else:
            problems += _file_problem(cfg.predictions, "predictions", "a JSONL prediction file")
    return problems


def benchmark_content_problems(bench: DictConfig, key: str) -> list[str]:
    """A local benchmark read as evaluation reads it (every line, field and gold answer; seconds, no
    model): a malformed file fails here rather than after training."""
    from palign.artifacts.errors import DataFormatError
    from palign.evaluation.benchmarks import load_benchmark

    arguments = {
        name: value for name, value in OmegaConf.to_container(bench, resolve=True).items() if name != "exclude_training"
    }
    try:
        load_benchmark(**arguments)
    except (DataFormatError, ValueError, OSError) as err:
        return [f"{key}: {err}"]
    return []


def teacher_problems(source: DictConfig) -> list[str]:
    """The teacher source's files (and, for generated traces, its problems and model)."""
    target = str(source.get("_target_", ""))
    problems: list[str] = []
    if target.endswith("JsonlTeacher"):
        problems += _file_problem(source.path, "teacher.source.path", "a JSON or JSONL file of teacher traces")
    elif target.endswith("S1KTeacher"):
        path = str(source.path)
        if not Path(path).exists():
            if looks_like_hub_id(path):
                problems += hub_problems(path, "teacher.source.path", "dataset")
            else:
                problems.append(
                    f"teacher.source.path={path}: no such file, and not a Hub id (namespace/name); point it "
                    "at a local .jsonl, .json, .parquet or .csv copy of s1K-1.1, or at a Hub dataset"
                )
    elif target.endswith("GeneratedTeacher"):
        problems_cfg = source.problems
        if problems_cfg.kind == "file":
            if not problems_cfg.path:
                problems.append("teacher.source.problems.path: problems.kind=file needs a JSON/JSONL file of problems")
            else:
                problems += _file_problem(
                    problems_cfg.path, "teacher.source.problems.path", "a JSON/JSONL file of problems"
                )
        if source.remote is None:
            problems += model_problems(source.model, "teacher.source.model")
        elif not source.remote.base_url or not source.remote.model:
            problems.append(
                "teacher.source.remote: a server needs base_url (e.g. http://127.0.0.1:8000/v1) and the "
                "model name it serves"
            )
    return problems


def models_used(cfg: DictConfig) -> dict[str, Any]:
    """The model nodes the run's stages load, by config key (the student, the judge, the continuing
    model, the chain judge's)."""
    stage = cfg.stage
    models: dict[str, Any] = {}
    if stage not in ("grade", "report"):
        models["student"] = cfg.student
    if stage in TEACHER_STAGES:
        if not unused_reason(cfg, "truncation.judge"):
            models["truncation.judge.model"] = cfg.truncation.judge.model
        if not unused_reason(cfg, "alignment"):
            models["alignment.model"] = cfg.alignment.model
    if stage == "judge_chains":  # its tokenizer at least, whichever back end judges
        models["chain_judge.model"] = cfg.chain_judge.model
    return models


def model_problems(spec: Any, key: str) -> list[str]:
    from palign.llm.models import model_source_problem

    problem = model_source_problem(spec)
    if problem is not None:
        return [f"{key}: {problem}"]
    if spec.source == "hub" and not Path(spec.pretrained).exists():
        return hub_problems(spec.pretrained, f"{key}.pretrained", "model")
    return []


def _file_problem(path: Any, key: str, what: str, alternative: str = "") -> list[str]:
    path = Path(str(path))
    if path.is_file():
        return []
    found = "is a folder, not a file" if path.exists() else "does not exist"
    return [f"{key}={path}: {found}; point it at {what}" + (f", {alternative}" if alternative else "")]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(value: str) -> bool:
    """`namespace/name` without a file suffix: what the Hub names a repository."""
    return bool(HUB_ID.match(value)) and Path(value).suffix not in (".json", ".jsonl", ".parquet", ".csv")


def hub_problems(repo_id: str, key: str, repo_type: str) -> list[str]:
    """A Hub repository that does not exist, when the Hub can be asked (HF_HUB_OFFLINE unset); a
    Hub that cannot be reached is only a warning (the run may find the repository in its cache)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return []
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10)
    except RepositoryNotFoundError:
        return [f"{key}={repo_id}: no such {repo_type} on the Hugging Face Hub (or it is private and no token is set)"]
    except Exception as err:  # noqa: BLE001 (an unreachable Hub decides nothing)
        log.warning("%s=%s: could not ask the Hub whether it exists (%s: %s)", key, repo_id, type(err).__name__, err)
    return []


# -- Lightning ------------------------------------------------------------------------------------------
def trainer_problems(cfg: DictConfig, *, hardware: bool) -> list[str]:
    """Lightning's Trainer arguments and the batch arithmetic.

    With `hardware`, the Trainer is constructed as the run constructs it (no logger, no callbacks:
    nothing is written) and whatever Lightning refuses is reported; its world size then checks the
    batch arithmetic. Without, the names are checked against Lightning's registries and the
    arithmetic against the devices the config spells out.
    """
    from typing import get_args

    from lightning_fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    from pytorch_lightning.accelerators import AcceleratorRegistry
    from pytorch_lightning.strategies import StrategyRegistry

    trainer = cfg.trainer
    problems: list[str] = []
    precisions = (*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS))
    if str(trainer.precision) not in precisions:
        problems.append(f"trainer.precision={trainer.precision}: Lightning knows {', '.join(precisions)}")
    accelerators = sorted({*AcceleratorRegistry.available_accelerators(), "gpu", "auto"})
    if isinstance(trainer.accelerator, str) and trainer.accelerator not in accelerators:
        problems.append(f"trainer.accelerator={trainer.accelerator}: Lightning knows {', '.join(accelerators)}")
    strategy = trainer.strategy
    if isinstance(strategy, str):
        if any(word in strategy for word in SPAWNING):
            problems.append(
                f"trainer.strategy={strategy}: its processes' training state does not come back to the "
                "exporting process; use trainer.strategy=ddp (Lightning starts one process per device and "
                "each runs the pipeline) or trainer=fsdp"
            )
        elif strategy != "auto" and strategy not in StrategyRegistry.available_strategies():
            problems.append(
                f"trainer.strategy={strategy}: not a Lightning strategy; use auto, ddp, trainer=fsdp or a "
                "strategy node with a _target_"
            )
    devices = OmegaConf.to_container(trainer.devices) if OmegaConf.is_config(trainer.devices) else trainer.devices
    if devices == 0 or devices == [] or (isinstance(devices, int) and devices < -1):
        problems.append(f"trainer.devices={devices}: a count >= 1, -1 (every device), 'auto' or a list of device ids")
    count = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) and devices > 0 else None
    world_size = count * trainer.num_nodes if count else None  # -1 or auto: known on the job's machine only
    if hardware and not problems:  # (with problems, the Trainer would refuse the same less clearly)
        try:
            world_size = _constructed_world_size(cfg)
        except Exception as err:  # noqa: BLE001 (Lightning's refusal, reported with the keys it concerns)
            cause = err.__cause__ or err  # Hydra wraps the Trainer's own exception
            return [
                f"trainer (accelerator={trainer.accelerator}, devices={devices}, num_nodes={trainer.num_nodes}, "
                f"strategy={_describe(strategy)}, precision={trainer.precision}): Lightning refuses it: "
                f"{type(cause).__name__}: {' '.join(str(cause).split())}"
            ]
    if world_size is None:
        return problems
    try:
        accumulation_steps(cfg.training.effective_batch_size, cfg.data.micro_batch_size, world_size)
    except ConfigError as err:
        problems.append(str(err))
    return problems


def _describe(strategy: Any) -> str:
    return strategy if isinstance(strategy, str) else str(strategy.get("_target_", "a strategy node"))


def _constructed_world_size(cfg: DictConfig) -> int:
    """The world size of the Trainer the run would build (the same node, no logger, writing nothing)."""
    import logging as std_logging

    from hydra.utils import instantiate

    quiet = std_logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(std_logging.WARNING)  # "GPU available: ..." is printed once, by the run's own Trainer
    try:
        trainer = instantiate(
            cfg.trainer,
            logger=False,
            callbacks=[],
            enable_checkpointing=False,
            max_epochs=cfg.training.epochs,
            max_steps=cfg.training.max_steps,
            use_distributed_sampler=False,
        )
    finally:
        quiet.setLevel(level)
    return trainer.world_size


def accumulation_steps(effective: int, micro: int, world_size: int) -> int:
    """Micro-batches each process accumulates per optimizer step: effective batch = micro batch x
    accumulation x world size (processes over every node), which must come out exact."""
    per_step = micro * world_size
    if effective % per_step:
        reachable = sorted({per_step * k for k in (max(1, effective // per_step), effective // per_step + 1)})
        raise ConfigError(
            f"training.effective_batch_size={effective} is not a multiple of data.micro_batch_size={micro} x "
            f"{world_size} process{'es' * (world_size != 1)} (trainer.devices x trainer.num_nodes) = {per_step}: "
            f"an optimizer step could not see exactly {effective} examples; "
            f"use e.g. {' or '.join(map(str, reachable))}, or change the micro batch"
        )
    return effective // per_step


def check_launcher(strategy: Any) -> None:
    """Refuse the strategies that train in processes they start themselves (ddp_spawn, ddp_fork,
    ddp_notebook): what those processes learn (steps, the loss curve, checkpoint states) never comes
    back to the process that exports and writes the summary."""
    if isinstance(strategy, str) and any(word in strategy for word in SPAWNING):
        raise ConfigError(
            f"trainer.strategy={strategy}: its processes' training state does not come back to the "
            "exporting process; use trainer.strategy=ddp (Lightning starts one process per device "
            "and each runs the pipeline) or fsdp"
        )


# -- inference back ends ------------------------------------------------------------------------------
def inference_backends(cfg: DictConfig) -> dict[str, DictConfig]:
    """The `backend` node of every inference stage the run executes, by config key."""
    stage = cfg.stage
    backends: dict[str, DictConfig] = {}
    if stage in TEACHER_STAGES:
        if not unused_reason(cfg, "truncation.judge"):
            backends["truncation.judge.backend"] = cfg.truncation.judge.backend
        if not unused_reason(cfg, "alignment"):
            backends["alignment.backend"] = cfg.alignment.backend
        source = cfg.teacher.source
        if "backend" in source and source.get("remote") is None:
            backends["teacher.source.backend"] = source.backend
    if stage in EVAL_STAGES and any(b is not None for b in (cfg.evaluation.benchmarks or {}).values()):
        backends["evaluation.backend"] = cfg.evaluation.backend
    return backends


def inference_problems(cfg: DictConfig, *, hardware: bool) -> list[str]:
    """What each stage's back-end option refuses (palign/llm/backends.py: Backend.problems): a server
    without its URL, vLLM without a GPU, Ray workers that cannot hold their engine; and the judge's
    logits mode on a back end that cannot score verdicts."""
    from hydra.utils import instantiate

    problems: list[str] = []
    for key, node in inference_backends(cfg).items():
        try:
            option = instantiate(node)
        except Exception as err:  # noqa: BLE001 (a wrong option: Hydra's message names the class and key)
            problems.append(f"{key}: {err}")
            continue
        problems += option.problems(key, hardware=hardware)
        if key == "truncation.judge.backend" and cfg.truncation.judge.mode == "logits" and not problems:
            refusal = logits_refusal(option.resolve(key), key)
            if refusal:
                problems.append(refusal)
    return problems


def logits_refusal(option: Any, key: str) -> str | None:
    """Why `option` cannot score the judge's verdicts (logits mode), or None; sends nothing."""
    check = getattr(option, "check_logits_mode", None)
    if check is None:
        return None
    try:
        check()
    except ValueError as err:
        return f"{key}: {err}"
    return None


# -- sweeps ------------------------------------------------------------------------------------------
class PreflightSweep(Callback):
    """Hydra callback: before a multirun launches its first job, compose every job's config and
    `preflight` it; the sweep is refused (nothing launched, nothing written) with every failing
    job's problems. Jobs that run elsewhere (a SLURM launcher) are checked without the hardware
    checks, which their own `preflight` repeats on their node. A single run is checked before
    Hydra creates its output folder (`hydra.run.dir`), which it does before the run starts (the run
    checks itself again: `palign.pipeline.run` is also called without Hydra)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            preflight(config, list(config.hydra.overrides.task))
        except ConfigError as err:
            # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings and runs anyway
            raise SystemExit(str(err)) from None
        except Exception as err:  # noqa: BLE001 (the run's own preflight meets it again, with its traceback)
            log.warning("preflight: could not check the run before it starts (%s: %s)", type(err).__name__, err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            jobs = sweep_jobs(config)
        except Exception as err:  # noqa: BLE001 (the jobs check themselves when they start)
            log.warning(
                "preflight: could not list the sweep's jobs (%s: %s); each job checks itself when it starts",
                type(err).__name__,
                err,
            )
            return
        if jobs is None:
            log.info(
                "preflight: the sweeper %s is not Hydra's basic sweeper; each job checks itself when it starts",
                config.hydra.sweeper.get("_target_"),
            )
            return
        hardware = "slurm" not in str(config.hydra.launcher.get("_target_", "")).lower()
        failures = []
        for number, overrides in enumerate(jobs):
            try:
                job = load_job_config(config, overrides)
                preflight(job, overrides, hardware=hardware)
            except Exception as err:  # noqa: BLE001 (every job's problems are reported together)
                lines = str(err).replace("this run would fail; nothing was loaded or written:\n", "").splitlines()
                failures.append(
                    f"job #{number} ({' '.join(overrides)}):\n" + "\n".join(f"    {line.strip()}" for line in lines)
                )
        if failures:
            # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings and launches anyway
            raise SystemExit(
                f"{len(failures)} of {len(jobs)} jobs of this sweep would fail, so none was launched:\n"
                + "\n".join(failures)
            )
        log.info(
            "preflight: the %d jobs of this sweep are sound%s",
            len(jobs),
            "" if hardware else " (hardware checks run on each job's node)",
        )


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides as Hydra's basic sweeper will launch them (its `params` and the command
    line's sweeps, expanded in its order); None for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    arguments = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    arguments += list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def load_job_config(config: DictConfig, overrides: list[str]) -> DictConfig:
    """One job's config, composed as the launcher composes it."""
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().config_loader().load_sweep_config(master_config=config, sweep_overrides=overrides)
