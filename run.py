"""palign entry point: `python run.py [stage=...] [group=choice ...] [-m for sweeps]`.

Composes conf/config.yaml with Hydra and runs the stages the chosen baseline needs
(see palign/pipeline.py). `python run.py` with no arguments runs the embedded CPU default.
"""

import hydra
from omegaconf import DictConfig

import palign.config  # noqa: F401  (registers the config resolvers before Hydra composes)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from palign.pipeline import run
    from palign.sweeps import run_job_safely

    run_job_safely(run, cfg)


if __name__ == "__main__":
    main()
