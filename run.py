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


# settings that moved when a baseline became parts (its prefix policy, `baseline.prefix`) and stage 1's
# search, granularity and threshold `_target_` nodes: the way to give each now
MOVED = {
    "baseline.ratio": "baseline.prefix.ratio={value} (baseline=fixed_ratio)",
    "baseline.truncation": "baseline=<an option of conf/baseline/>, whose prefix policy is baseline.prefix._target_",
    "truncation.search.name": "truncation/search={value}",
    "truncation.search.chunk_size": "truncation.chunk_size={value}",
    "truncation.granularity.name": "truncation/granularity={value}",
    "truncation.granularity.options.chunk_tokens": "truncation.granularity.chunk_tokens={value} "
    "(truncation/granularity=token_chunk)",
    "truncation.judge.threshold.kind": "truncation/judge/threshold={value}",
}


# each inference stage's back end is an option of conf/backend/ chosen per stage (backend@KEY=NAME);
# the shorter KEY=NAME of earlier versions and of habit is read as that choice
BACKEND_CHOICE = re.compile(
    r"^(?P<key>(?:truncation\.judge|alignment|evaluation|teacher\.source|chain_judge)\.backend)=(?P<names>[\w,]+)$"
)


def backend_choices(arguments: list[str]) -> list[str]:
    """`alignment.backend=vllm` as `backend@alignment.backend=vllm` (sweeps too: `...=hf,ray`)."""
    return [
        f"backend@{match['key']}={match['names']}" if (match := BACKEND_CHOICE.match(argument)) else argument
        for argument in arguments
    ]


# whole nodes that moved when back ends became options (conf/backend/): old prefix -> new prefix
MOVED_NODES = {
    "chain_judge.remote.": "chain_judge.backend.",  # chain_judge=openai: the server is the back end's fields
    **{f"{stage}.ray.": "ray." for stage in ("truncation.judge", "alignment", "evaluation", "teacher.source")},
    "teacher.source.vllm.": "vllm.",  # one `ray:` and one `vllm:` block, read by every stage's ray or vllm option
}


def refuse_unmergeable_overrides(arguments: list[str]) -> None:
    for argument in arguments:
        key, _, value = argument.lstrip("+~").partition("=")
        if key in MOVED:
            sys.exit(f"{argument}: this setting moved; give it as {MOVED[key].format(value=value)}")
        for old, new in MOVED_NODES.items():
            if key.startswith(old):
                sys.exit(f"{argument}: this setting moved; give it as {new}{key[len(old) :]}={value}")
        if match := BENCHMARK_AS_DICT.match(argument):
            name = match["name"]
            sys.exit(
                f"{argument}: a benchmark is given as a benchmark option and then field by field, not as one "
                f"{{...}} value: +benchmark@evaluation.benchmarks.{name}=<an option of conf/benchmark/, e.g. "
                f"aime24> evaluation.benchmarks.{name}.local_path=PATH (and any other field)"
            )


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from palign.pipeline import run
    from palign.sweeps import run_job_safely

    run_job_safely(run, cfg)


if __name__ == "__main__":
    sys.argv[1:] = backend_choices(sys.argv[1:])
    refuse_unmergeable_overrides(sys.argv[1:])
    main()
