"""The run: compose the stages a baseline needs, in a named, resumable run folder.

A run is identified by its readable name plus a fingerprint of the config values that change its
results (`palign.runs.run_identity`). The run folder `<paths.runs>/<run id>` holds the
resolved config, Lightning checkpoints (`checkpoints/last.ckpt`), the trained student
(`student/`, a plain `from_pretrained` folder), evaluation predictions and `summary.json`.
Rerunning the same command finds the same folder: finished stages are skipped and an interrupted
training resumes from `last.ckpt`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from palign.artifacts.readers import read_json
from palign.artifacts.stores import is_global_zero
from palign.artifacts.writes import write_json_atomic, write_text_atomic
from palign.preflight import accumulation_steps, check_launcher, preflight
from palign.runs import run_folder, unused_reason
from palign.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    cfg: DictConfig
    run_id: str
    run_dir: Path
    cache_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def student_dir(self) -> Path:
        return self.run_dir / "student"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def make_context(cfg: DictConfig) -> RunContext:
    run_id, run_dir = run_folder(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_global_zero():
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    summary_path = run_dir / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else {}
    return RunContext(cfg=cfg, run_id=run_id, run_dir=run_dir, cache_dir=Path(cfg.paths.cache_dir), summary=summary)


def save_summary(ctx: RunContext) -> None:
    if is_global_zero():  # one writer: the other ranks of a distributed job only train
        write_json_atomic(ctx.run_dir / "summary.json", ctx.summary)


def record_placement(ctx: RunContext) -> None:
    """Where each inference model of the run's stages runs (device and dtype), into the summary."""
    from palign.llm.models import placement

    cfg = ctx.cfg
    models = {"alignment": cfg.alignment.model, "evaluation": cfg.student}
    if not unused_reason(cfg, "truncation.judge"):
        models["judge"] = cfg.truncation.judge.model
    ctx.summary["inference_placement"] = {stage: placement(model) for stage, model in models.items()}


def make_teacher(cfg: DictConfig):
    from hydra.utils import instantiate

    return instantiate(cfg.teacher.source)


def _container(node) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)


def make_truncation(ctx: RunContext, tokenizer):
    """Stage 1 from its node (conf/truncation/) with the baseline's prefix policy (`baseline.prefix`);
    None when the policy makes no prefixes. The stage receives the schema's typed nodes, its
    `_target_` parts (splitter, search, threshold, policy) built."""
    from hydra.utils import instantiate

    cfg = ctx.cfg
    if unused_reason(cfg, "truncation"):
        return None
    return instantiate(
        cfg.truncation, _convert_="object", prefix=cfg.baseline.prefix, cache_dir=ctx.cache_dir, tokenizer=tokenizer
    )


def make_alignment(ctx: RunContext, tokenizer):
    """Stage 2 (the student continues the prefixes), when the baseline has it."""
    from hydra.utils import instantiate

    cfg = ctx.cfg
    if not cfg.baseline.alignment:
        return None
    return instantiate(
        cfg.alignment, _convert_="all", prompts=_container(cfg.prompts), cache_dir=ctx.cache_dir, tokenizer=tokenizer
    )


def make_datamodule(ctx: RunContext, tokenizer):
    """Stage 3's data (conf/data/, palign/schema.py: Data), calling stages 1 and 2 as it loads."""
    from hydra.utils import instantiate

    cfg = ctx.cfg
    return instantiate(
        cfg.data,
        teacher=make_teacher(cfg),
        tokenizer=tokenizer,
        prompts=_container(cfg.prompts),
        target=cfg.baseline.target,
        cache_dir=str(ctx.cache_dir),
        seed=cfg.seed,
        markers=_container(cfg.prompts.prefix_markers),
        chat_template_kwargs=dict(cfg.student.chat_template_kwargs),
        prefix_stage=make_truncation(ctx, tokenizer),
        continuation_stage=make_alignment(ctx, tokenizer),
    )


def build_trainer(ctx: RunContext, tracker: Tracker, callbacks: list):
    """Lightning's Trainer from conf/trainer/ (palign/schema.py: Trainer) with the run's epochs,
    steps, loggers and checkpoints; gradient accumulation from the running world size."""
    from hydra.utils import instantiate

    from palign.training.checkpointing import AtomicCheckpointIO

    cfg = ctx.cfg
    trainer = instantiate(
        cfg.trainer,
        max_epochs=cfg.training.epochs,
        max_steps=cfg.training.max_steps,
        logger=tracker.lightning_logger,
        callbacks=callbacks,
        default_root_dir=str(ctx.run_dir),
        enable_checkpointing=True,
        plugins=[AtomicCheckpointIO()],
        # The training loader shards itself (palign/data/sampling.py: every rank takes every
        # world-size-th length-grouped micro-batch of one seeded order, and resumes mid-epoch);
        # Lightning's DistributedSampler would replace that sampler and lose both.
        use_distributed_sampler=False,
        **({} if cfg.data.val_size else {"limit_val_batches": 0}),
    )
    # the world size is the running trainer's (devices x nodes, as the strategy resolved them)
    trainer.accumulate_grad_batches = accumulation_steps(
        cfg.training.effective_batch_size, cfg.data.micro_batch_size, trainer.world_size
    )
    return trainer


def leave_process_group() -> None:
    """End the job's process group once training is done: what rank 0 does next alone (export,
    evaluation, whose torchmetrics would otherwise wait for the other ranks) is not collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def train_stage(ctx: RunContext, tracker: Tracker) -> None:
    """Stage 3 on every process of the job; the export and the summary on global rank 0 only."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import LearningRateMonitor

    from palign.llm.models import load_model, load_tokenizer
    from palign.training.checkpointing import ReleaseVLLMEngines, ResumableCheckpoint

    cfg = ctx.cfg
    if ctx.summary.get("train", {}).get("complete") and (ctx.student_dir / "config.json").exists():
        log.info("training already finished in %s; skipping (delete the folder to retrain)", ctx.run_dir)
        return
    check_launcher(cfg.trainer.strategy)
    pl.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(cfg.student, ctx.cache_dir)
    datamodule = make_datamodule(ctx, tokenizer)
    checkpoint = ResumableCheckpoint(
        dirpath=str(ctx.checkpoint_dir),
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.training.checkpoint_every_n_steps,
        save_on_train_epoch_end=True,
    )
    callbacks = [checkpoint, ReleaseVLLMEngines()]
    callbacks += [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    if tracker.logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = build_trainer(ctx, tracker, callbacks)  # checks the batch math against the world size first
    # Stages 1 and 2 and tokenization before the Trainer starts, in this process: under DDP the
    # processes Lightning launches at fit() (or the other SLURM tasks, which wait on the caches'
    # locks, paths.lock_timeout_s) read what it computed, and no rank waits behind a collective.
    datamodule.prepare_data()
    module = instantiate(cfg.training, _convert_="all", model_loader=partial(load_model, cfg.student, ctx.cache_dir))
    last = ctx.checkpoint_dir / "last.ckpt"
    resumed_from = str(last) if last.exists() else None  # read before fit writes its own
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resumed_from)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted; rerun the same command to resume from last.ckpt")
    rank_zero = trainer.is_global_zero
    leave_process_group()
    if not rank_zero:
        return
    module.export_pretrained(ctx.student_dir, tokenizer)
    if datamodule.prefix_stage is not None:
        report_stage_stats(ctx, tracker, datamodule.prefix_stage)
    if datamodule.continuation_stage is not None:
        report_stage_stats(ctx, tracker, datamodule.continuation_stage)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    ctx.summary["data"] = datamodule.stats
    ctx.summary["train"] = {
        "complete": True,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "world_size": trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "seconds": round(time.perf_counter() - started, 1),
        "resumed_from": resumed_from,
        "tokens_seen": module.tokens_seen,
        "metrics": metrics,
        "loss_curve": getattr(module, "loss_curve", []),
    }
    save_summary(ctx)


def truncate_stage(ctx: RunContext, tracker: Tracker) -> None:
    """Stage 1 alone on the training problems: prints and logs the truncation statistics."""
    from palign.llm.models import load_tokenizer

    cfg = ctx.cfg
    tokenizer = load_tokenizer(cfg.student, ctx.cache_dir)
    truncation = make_truncation(ctx, tokenizer)  # check_stage_applies: the baseline truncates
    truncation.run(training_records(cfg))
    report_stage_stats(ctx, tracker, truncation)


def teacher_ids(cfg: DictConfig) -> list[str]:
    """Every problem of the teacher's data set, whichever of them this seed's split trains on: what a
    held-out benchmark leaves out, so runs that differ by their seed evaluate the same problems (and
    the report can pool them, palign/reporting/comparisons.py)."""
    return sorted(r.id for r in make_teacher(cfg).load().records)


def training_records(cfg: DictConfig):
    from palign.data.datamodule import split_records

    data = make_teacher(cfg).load()
    train, _ = split_records(data.records, cfg.data.val_size, cfg.seed, data.skipped)
    return train[: cfg.data.train_limit] if cfg.data.train_limit is not None else train


def align_stage(ctx: RunContext, tracker: Tracker) -> None:
    """Stages 1 and 2 alone on the training problems: prefixes, continuations, retention."""
    from palign.llm.models import load_tokenizer

    cfg = ctx.cfg
    tokenizer = load_tokenizer(cfg.student, ctx.cache_dir)
    alignment = make_alignment(ctx, tokenizer)  # check_stage_applies: the baseline aligns
    truncation = make_truncation(ctx, tokenizer)
    records = training_records(cfg)
    prefixes = truncation(records) if truncation is not None else None
    alignment(records, prefixes)
    if truncation is not None:
        report_stage_stats(ctx, tracker, truncation)
    report_stage_stats(ctx, tracker, alignment)


def report_stage_stats(ctx: RunContext, tracker: Tracker, stage: ReportingStage) -> None:
    """Stage 1's or 2's statistics into the run's summary, and its own console/W&B report."""
    ctx.summary[stage.SUMMARY_KEY] = stage.report(tracker)
    save_summary(ctx)


def eval_stage(ctx: RunContext, tracker: Tracker) -> None:
    """Stage 4: the run's trained student (or `evaluation.model_path`) on the configured benchmarks."""
    from hydra.utils import instantiate

    cfg = ctx.cfg
    # a partial, called here: the whole evaluation runs in this call, and its errors (a benchmark's bad gold
    # answer, a full disk) reach the user as they are, not as Hydra's InstantiationException, which
    # shows their repr (quoted, every backslash of a path or of LaTeX doubled)
    evaluate = instantiate(
        cfg.evaluation,
        _convert_="all",
        _partial_=True,
        student=_container(cfg.student),
        method=cfg.baseline.name,
        prompts=_container(cfg.prompts),
        cache_dir=ctx.cache_dir,
        run_dir=ctx.run_dir,
        trained=ctx.student_dir,
        training_ids=lambda: teacher_ids(cfg),
        tracker=tracker,
    )
    summary = evaluate()
    if summary is not None:
        ctx.summary["eval"] = summary
        save_summary(ctx)


def grade_stage(ctx: RunContext, tracker: Tracker) -> None:
    """Grade an existing prediction file (`predictions=PATH`) and print its metrics.

    The per-sample grades go to `<run dir>/<input stem>.graded.jsonl`, in the format evaluation
    writes (so a pass@1 can be traced to the samples behind it); the summary records its path.
    """
    from palign.artifacts.writes import write_jsonl_atomic
    from palign.evaluation.predictions import grade_prediction_file
    from palign.grading import GradingPool

    cfg = ctx.cfg
    if not cfg.predictions:
        raise ValueError("stage=grade needs predictions=PATH (JSONL with `answer` and a list of sampled `output`s)")
    path = Path(cfg.predictions)
    with GradingPool(num_workers=cfg.evaluation.grading.workers, timeout_s=cfg.evaluation.grading.timeout_s) as pool:
        rows, summary = grade_prediction_file(path, pool)
    graded = ctx.run_dir / f"{path.stem}.graded.jsonl"
    write_jsonl_atomic(graded, rows)
    print(
        f"{path}: " + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}" for k, v in summary.items())
    )
    print(f"per-sample grades written to {graded}")
    summary["graded"] = str(graded)
    ctx.summary.setdefault("graded", {})[str(path)] = summary
    save_summary(ctx)
    tracker.log_summary({f"grade/{k}": v for k, v in summary.items()})


def report_stage(ctx: RunContext, tracker: Tracker) -> None:
    """Table 1, the ablation tables and the report figures from every evaluated run under paths.runs and
    every prediction file graded under <paths.root>/grade (the `report` node: palign/schema.py: Report)."""
    from palign.reporting.report import make_report

    cfg = ctx.cfg
    out = Path(cfg.paths.root) / "report"
    # the report node's settings; the recipe's own config (each ablation's reference arm); stage=grade's folders
    result = make_report(
        cfg.paths.runs,
        out,
        OmegaConf.to_object(cfg.report),
        tracker=tracker,
        graded_dir=Path(cfg.paths.root) / "grade",
        recipe=OmegaConf.to_container(cfg, resolve=True),
    )
    print(result["table1"])
    print(f"tables, figures and report.md written to {out}")


def judge_chains_stage(ctx: RunContext, tracker: Tracker) -> None:
    """ "GLM-based evaluation" (PAPER.md §4, §8) of the run's training problems: palign/analysis/chain_judge.py."""
    from hydra.utils import instantiate

    from palign.llm.models import load_tokenizer

    cfg = ctx.cfg
    tokenizer = load_tokenizer(cfg.student, ctx.cache_dir)
    stages = {}  # the stages 1 and 2 the compared targets need, built on first use

    def stage(name: str):
        if name not in stages:
            stages[name] = (make_truncation if name == "truncation" else make_alignment)(ctx, tokenizer)
        return stages[name]

    # a partial, called with the runtime arguments: Hydra would turn the records (dataclasses) into configs
    judge = instantiate(cfg.chain_judge, _convert_="all", _partial_=True)
    comparison, judge_label, stats = judge(
        records=training_records(cfg),
        baseline=cfg.baseline.name,
        truncation=lambda: stage("truncation"),
        alignment=lambda: stage("alignment"),
        markers=_container(cfg.prompts.prefix_markers),
        cache_dir=ctx.cache_dir,
        run_dir=ctx.run_dir,
        tracker=tracker,
    )
    ctx.summary.setdefault("chain_judge", {}).setdefault(comparison, {})[judge_label] = stats
    save_summary(ctx)
    for built in stages.values():
        if built is not None:
            report_stage_stats(ctx, tracker, built)


def print_summary(ctx: RunContext) -> str:
    lines = [f"run {ctx.run_id}", f"  outputs: {ctx.run_dir}"]
    train = ctx.summary.get("train", {})
    if train:
        curve = train.get("loss_curve") or []
        lines.append(
            f"  train:   {train.get('global_step')} optimizer steps in {train.get('seconds')} s"
            + (f", loss {curve[0]:.3f} -> {curve[-1]:.3f}" if curve else "")
        )
        lines.append(f"  student: {ctx.student_dir}")
    trunc = ctx.summary.get("truncation")
    if trunc and trunc.get("examples"):
        lines.append(
            f"  prefix:  {trunc['examples']} traces, mean prefix ratio {trunc['prefix_ratio_mean']:.2f} "
            f"(median {trunc['prefix_ratio_median']:.2f}), fallback {100 * trunc['fallback_rate']:.0f}%, "
            f"{trunc['judge_calls_per_example']:.1f} judge calls/example, "
            f"{100 * trunc['tokens_saved_fraction']:.0f}% tokens saved"
            + (
                f", {trunc['probes_over_context']} probes of {trunc['examples_over_context']} traces over the judge's "
                "context (not sufficient)"
                if trunc.get("probes_over_context")
                else ""
            )
        )
    data = ctx.summary.get("data", {})
    if data:
        lines.append(
            f"  data:    {data.get('train/examples')} train examples, "
            f"{data.get('train/dropped_too_long')} dropped (too long)"
        )
    align = ctx.summary.get("alignment")
    if align and align.get("examples"):
        lines.append(
            f"  align:   {align['correct']}/{align['examples']} continuations correct "
            f"(retention {100 * align['retention']:.0f}%)"
        )
    for comparison, by_judge in ctx.summary.get("chain_judge", {}).items():
        for judge_label, s in by_judge.items():
            if s.get("pairs"):
                consistency = s["position_consistency"]
                lines.append(
                    f"  judge:   {comparison} by {judge_label}: A wins {100 * s['a_win_rate']:.0f}%, "
                    f"ties {100 * s['tie_rate']:.0f}%, loses {100 * s['a_loss_rate']:.0f}% of {s['pairs']} pairs; "
                    f"{s['unparseable']}/{s['judgments']} verdicts unparseable"
                    + (f"; position-consistent {100 * consistency:.0f}%" if consistency is not None else "")
                )
    evaluation = ctx.summary.get("eval")
    if evaluation:
        lines.append("  eval:")
        lines.extend("    " + line for line in evaluation["table"].strip().splitlines())
    text = "\n".join(lines)
    print(text)
    return text


def command_line_overrides() -> list[str]:
    """The overrides given on the command line (none when composed through the Python API)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def ablation_keys(cfg: DictConfig) -> dict[str, Any]:
    """The knob an ablation sweep (conf/ablation/) varies and this run's value of it, under flat keys
    of the W&B run config that its UI groups runs by: `ablation.name` (the conf/ablation/ file),
    `ablation.knob` (the swept key, e.g. truncation/search) and `ablation.value` (this run's choice,
    e.g. binary). Empty outside an ablation, or when the config was not composed by Hydra's launcher."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    name = hydra.runtime.choices.get("ablation")
    if not name:
        return {}
    knobs = list(hydra.sweeper.params or {})
    values = [hydra.runtime.choices[k] if k in hydra.runtime.choices else OmegaConf.select(cfg, k) for k in knobs]
    return {"ablation.name": name, "ablation.knob": ",".join(knobs), "ablation.value": ",".join(map(str, values))}


def method_stages(ctx: RunContext, tracker: Tracker) -> None:
    """stage=all: the method in its order (PAPER.md §2), on every process of the job.

    1. truncate: each teacher trace cut to the shortest prefix the student judges sufficient;
    2. align: the student continues each prefix, kept when its answer is right;
    3. train: SFT on prefix markers + teacher prefix + the student's continuation.
       Steps 1 and 2 run inside step 3's data module as it loads its data (`prepare_data`, as the
       design card asks), each cached and resumable, before the Trainer starts;
    4. evaluate: Pass@1 and Pass@k on the benchmarks, on global rank 0 alone.
    The stages a baseline lacks (palign/runs.py: unused_groups) build nothing.
    """
    train_stage(ctx, tracker)  # 1, 2, 3
    if is_global_zero():
        eval_stage(ctx, tracker)  # 4


class Stage(Protocol):
    """A step `stage=` selects: it reads the run's config from `ctx`, writes into its run folder and
    summary, and logs to `tracker`."""

    def __call__(self, ctx: RunContext, tracker: Tracker) -> None: ...


class ReportingStage(Protocol):
    """Stages 1 and 2 (PrefixTruncation, PrefixContinuation) as the run reports them: their
    statistics, logged to the tracker, go into the summary under SUMMARY_KEY."""

    SUMMARY_KEY: str

    def report(self, tracker: Tracker) -> dict[str, Any]: ...


# stage= -> the steps it runs, in the method's order
DISPATCH: dict[str, tuple[Stage, ...]] = {
    "all": (method_stages,),
    "truncate": (truncate_stage,),
    "align": (align_stage,),
    "train": (train_stage,),
    "eval": (eval_stage,),
    "grade": (grade_stage,),
    "report": (report_stage,),
    "judge_chains": (judge_chains_stage,),
}


# the steps every process of a distributed job runs (training is collective); the others run on global rank 0 alone
EVERY_RANK: tuple[Stage, ...] = (method_stages, train_stage)


def run(cfg: DictConfig) -> dict[str, Any]:
    from palign.artifacts.stores import set_lock_timeout

    # everything that can be checked without a model, before a model loads or the run folder is written
    preflight(cfg, command_line_overrides())
    set_lock_timeout(cfg.paths.lock_timeout_s)
    ctx = make_context(cfg)
    if cfg.stage not in ("grade", "report"):  # the stages that run a model
        record_placement(ctx)
    tracker = Tracker(
        kind=cfg.logger.kind,
        run_dir=ctx.run_dir,
        run_id=ctx.run_id,
        run_name=cfg.run_name,
        group=cfg.group,
        job_type=cfg.stage,
        tags=list(cfg.tags),
        config={**OmegaConf.to_container(cfg, resolve=True), **ablation_keys(cfg)},
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        mode=cfg.logger.mode,
        rank_zero=is_global_zero(),
    )
    failed = True
    try:
        for stage in DISPATCH[cfg.stage]:
            if stage in EVERY_RANK or is_global_zero():
                stage(ctx, tracker)
            else:
                log.info("%s runs on global rank 0 only; this process is done", stage.__name__)
        failed = False
    finally:
        tracker.close(failed=failed)
    if is_global_zero():
        print_summary(ctx)
    return ctx.summary
