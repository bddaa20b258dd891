"""The report: Table 1, the ablation tables and the figures from finished runs, with intervals,
paired differences, seeds pooled and published rows (palign/reporting/report.py).

Collects runs from local run folders and `stage=grade` folders (offline) or from one W&B group
(online), writes `<out>/<table>.md` and `.csv` (table1, reproduction, ablation_<knob>),
`forest_<table>.png`, `prefix_ratios.png`, `sufficiency_curves.png`, `accuracy_vs_length.png` and
`report.md` (all of it on one page), and prints Table 1. The report's settings are the `report`
node of the config that the overrides compose (palign/schema.py: Report), as for
`python run.py stage=report <overrides>`: a recipe names its published row and its own knob values.

Run from the repository root:
    python -m experiments.make_table                                   # outputs/runs -> outputs/report
    python -m experiments.make_table experiment=paper/table1_qwen2_5_7b report.reference=sft_short_cot
    python -m experiments.make_table --wandb-project palign --wandb-group my-sweep --log-wandb
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from palign.artifacts.digests import fingerprint
from palign.reporting.report import make_report


def compose(overrides: list[str]):
    """The config `python run.py stage=report <overrides>` would run with (conf/, without conf/local
    when `~local` is among the overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from palign.config import CONFIG_DIR
    from palign.schema import check_values

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["stage=report", *overrides])
    check_values(cfg)
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, as on run.py's command line (report.*, experiment=...)"
    )
    parser.add_argument("--runs-dir", help="run folders to collect (offline; default: the config's paths.runs)")
    parser.add_argument("--graded-dir", help="stage=grade folders to collect (default: <paths.root>/grade)")
    parser.add_argument("--out", help="where tables and figures go (default: <paths.root>/report)")
    parser.add_argument("--wandb-project", help="collect from this W&B project instead (online)")
    parser.add_argument("--wandb-group", help="the W&B group (the sweep's `group=`) to collect")
    parser.add_argument("--wandb-entity", help="W&B entity (user or team); default: yours")
    parser.add_argument("--log-wandb", action="store_true", help="also log the tables and figures to a W&B run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = compose(args.overrides)
    root = Path(cfg.paths.root)
    runs_dir = Path(args.runs_dir or cfg.paths.runs)
    graded_dir = Path(args.graded_dir) if args.graded_dir else root / "grade"
    out = Path(args.out) if args.out else root / "report"
    tracker = None
    if args.log_wandb:
        from palign.tracking import Tracker

        source = f"{args.wandb_project}/{args.wandb_group}" if args.wandb_project else str(runs_dir.resolve())
        tracker = Tracker(
            kind="wandb",
            run_dir=out,
            run_id=f"report-{fingerprint(source, length=8)}",
            run_name="report",
            group=args.wandb_group or "report",
            job_type="report",
            project=args.wandb_project or cfg.logger.project,
            entity=args.wandb_entity or cfg.logger.entity,
            mode=cfg.logger.mode,
            config={"report": OmegaConf.to_container(cfg.report, resolve=True)},
        )
    failed = True
    try:
        result = make_report(
            runs_dir,
            out,
            OmegaConf.to_object(cfg.report),
            tracker=tracker,
            graded_dir=graded_dir,
            recipe=OmegaConf.to_container(cfg, resolve=True),
            wandb_project=args.wandb_project,
            wandb_group=args.wandb_group,
            wandb_entity=args.wandb_entity,
        )
        failed = False
    finally:
        if tracker is not None:
            tracker.close(failed=failed)
    print(result["table1"])
    print(f"tables, figures and report.md written to {out}")
    return result


if __name__ == "__main__":
    main()
