"""palign entry point: `python run.py [stage=...] [group=choice ...] [-m for sweeps]`.

Composes conf/config.yaml with Hydra and runs the stages the chosen baseline needs
(see palign/pipeline.py). `python run.py` with no arguments runs the embedded CPU default.
"""

import re
import sys

import hydra
from omegaconf import DictConfig

import palign.config  # noqa: F401  (registers the config resolvers before Hydra composes)

# OmegaConf (2.3) cannot merge a `{...}` value into a typed benchmark node, and fails inside itself
# (an AttributeError for a benchmark a recipe left out with null, a ValidationError for a new one)
BENCHMARK_AS_DICT = re.compile(r"^\+*evaluation\.benchmarks\.(?P<name>[\w-]+)=\s*\{")


def refuse_unmergeable_overrides(arguments: list[str]) -> None:
    for argument in arguments:
        if match := BENCHMARK_AS_DICT.match(argument):
            name = match["name"]
            sys.exit(f"{argument}: a benchmark is given as a benchmark option and then field by field, not as one "
                     f"{{...}} value: +benchmark@evaluation.benchmarks.{name}=<an option of conf/benchmark/, e.g. "
                     f"aime24> evaluation.benchmarks.{name}.local_path=PATH (and any other field)")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from palign.pipeline import run
    from palign.sweeps import run_job_safely

    run_job_safely(run, cfg)


if __name__ == "__main__":
    refuse_unmergeable_overrides(sys.argv[1:])
    main()
