"""The report: Table 1, the ablation tables and the figures from finished runs.

Collects runs from local run folders (offline) or from one W&B group (online), writes
`<out>/<table>.md` and `.csv` (table1, ablation_<knob>), `prefix_ratios.png`,
`sufficiency_curves.png`, `accuracy_vs_length.png` and `report.md` (all of it on one page), and
prints Table 1. `python run.py stage=report` calls `make_report` with the run's tracker, which
also logs the tables and figures to W&B.

Run from the repository root:
    python -m experiments.make_table                                   # outputs/runs -> outputs/report
    python -m experiments.make_table --wandb-project palign --wandb-group my-sweep --log-wandb
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from palign.artifacts import fingerprint  # noqa: E402
from palign.reporting.report import make_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    outputs = Path(os.environ.get("PALIGN_OUTPUTS", "outputs"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default=str(outputs / "runs"), help="run folders to collect (offline)")
    parser.add_argument("--out", default=str(outputs / "report"), help="where tables and figures go")
    parser.add_argument("--wandb-project", help="collect from this W&B project instead (online)")
    parser.add_argument("--wandb-group", help="the W&B group (the sweep's `group=`) to collect")
    parser.add_argument("--wandb-entity", help="W&B entity (user or team); default: yours")
    parser.add_argument("--pass-k", type=int, default=None,
                        help="the Pass@k column beside Pass@1 (default: the runs' number of samples, 3 in the paper)")
    parser.add_argument("--pass1-key", default="pass@1", choices=("pass@1", "pass@1_first"),
                        help="Pass@1 as the mean over samples or the first sample (the paper does not say)")
    parser.add_argument("--log-wandb", action="store_true", help="also log the tables and figures to a W&B run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tracker = None
    if args.log_wandb:
        from palign.tracking import Tracker

        source = f"{args.wandb_project}/{args.wandb_group}" if args.wandb_project else str(Path(args.runs_dir).resolve())
        from palign.schema import Logger, defaults

        logger = defaults(Logger)
        tracker = Tracker(kind="wandb", run_dir=Path(args.out), run_id=f"report-{fingerprint(source, length=8)}",
                          run_name="report", group=args.wandb_group or "report", job_type="report",
                          project=args.wandb_project or logger["project"], entity=args.wandb_entity, mode=logger["mode"])
    failed = True
    try:
        result = make_report(args.runs_dir, args.out, args.pass_k, tracker, args.wandb_project, args.wandb_group,
                             args.wandb_entity, args.pass1_key)
        failed = False
    finally:
        if tracker is not None:
            tracker.close(failed=failed)
    print(result["table1"])
    print(f"tables, figures and report.md written to {args.out}")
    return result


if __name__ == "__main__":
    main()
