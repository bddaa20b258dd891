"""Every `python run.py ...` command in the READMEs composes, and runs what its text says.

The commands are read from README.md and experiments/README.md themselves, so a new or changed
command without an entry in DOCUMENTED fails here, and so does an entry whose command is gone.
Each entry lists the settings the command's text names; each value of a multirun (`a,b`) and each
job of an ablation sweep is composed.
"""

from __future__ import annotations

import itertools
import re
import shlex

import pytest
from omegaconf import OmegaConf

from tests.conftest import PROJECT_ROOT, compose_config

DOCS = [PROJECT_ROOT / "README.md", PROJECT_ROOT / "experiments" / "README.md"]

PAPER_QWEN25 = {  # PAPER.md §3-§5: what "the paper's setting" means
    "student.name": "qwen2_5_7b_instruct",
    "teacher.name": "s1k",
    "baseline.name": "palign",
    "choice:truncation/granularity": "paper_sentence",
    "choice:truncation/search": "binary",
    "choice:truncation/judge": "self_generate",
    "choice:truncation/judge_prompt": "paper",
    "alignment.filter": "correct",
    "choice:training": "paper",
    "training.lora.r": 16,
    "choice:trainer": "gpu",
    "choice:experiment": "paper/table1_qwen2_5_7b",
    "data.max_length": 32768,
    "data.train_limit": None,
    "training.learning_rate": 5e-5,
    "training.epochs": 3,
    "training.effective_batch_size": 32,
    "evaluation.sampling.num_samples": 3,
    "benchmarks": ["aime24", "aime25", "amc12", "math500"],
}
PAPER_QWEN3 = {**PAPER_QWEN25, "student.name": "qwen3_8b", "choice:experiment": "paper/table1_qwen3_8b"}
DEMO = {
    "student.name": "smollm2_135m",
    "teacher.name": "champ",
    "baseline.name": "palign",
    "choice:trainer": "cpu",
    "benchmarks": ["champ_heldout"],
    "choice:experiment": None,
    "choice:debug": None,
}
TINY = {"student.name": "tiny_random", "choice:experiment": "tiny", "truncation.judge.model.name": "tiny_random"}

# command (as written, without `python run.py`, `-m` and comments) -> the settings it names
DOCUMENTED: dict[str, dict] = {
    "": DEMO,
    "baseline=sft_long_cot": {**DEMO, "baseline.name": "sft_long_cot", "baseline.target": "long_cot"},
    "baseline=fixed_ratio baseline.prefix.ratio=0.25": {
        **DEMO,
        "baseline.name": "fixed_ratio",
        "baseline.prefix.ratio": 0.25,
    },
    "stage=truncate truncation/search=exhaustive": {
        **DEMO,
        "stage": "truncate",
        "choice:truncation/search": "exhaustive",
    },
    "stage=align": {**DEMO, "stage": "align"},
    "stage=eval evaluation=paper": {**DEMO, "stage": "eval", "benchmarks": ["aime24", "aime25", "amc12", "math500"]},
    "stage=grade predictions=../shared/data/reference/palign_qwen25_7b_aime24_outputs.jsonl": {
        "stage": "grade",
        "predictions": "../shared/data/reference/palign_qwen25_7b_aime24_outputs.jsonl",
    },
    "experiment=tiny": TINY,
    "experiment=paper/table1_qwen2_5_7b debug=fast": {
        **PAPER_QWEN25,
        "choice:debug": "fast",
        "data.train_limit": 4,
        "trainer.limit_train_batches": 2,
    },
    "teacher=jsonl teacher.source.path=my_traces.jsonl teacher.source.long_cot_field=trace": {
        "teacher.name": "jsonl",
        "teacher.source.path": "my_traces.jsonl",
        "teacher.source.long_cot_field": "trace",
    },
    "baseline=sft_long_cot,sft_short_cot group=my-sweep": {"group": "my-sweep", "teacher.name": "champ"},
    "experiment=paper/table1_qwen2_5_7b": PAPER_QWEN25,
    "ablation=search": {
        **DEMO,
        "group": "ablation-search-smollm2_135m",
        "sweep:truncation/search": ["binary", "linear", "exhaustive"],
    },
    "stage=eval": {**DEMO, "stage": "eval"},
    "baseline=palign backend@truncation.judge.backend=vllm truncation.judge.engine=batched "
    "backend@alignment.backend=vllm alignment.chunk_size=512 backend@evaluation.backend=vllm "
    "evaluation.chunk_size=512": {
        **DEMO,
        "choice:backend@truncation.judge.backend": "vllm",
        "truncation.judge.engine": "batched",
        "choice:backend@alignment.backend": "vllm",
        "choice:backend@evaluation.backend": "vllm",
    },
    "baseline=palign,fixed_ratio,sft_long_cot,sft_short_cot,prefix_only,student_only group=demo-table": {
        **DEMO,
        "group": "demo-table",
    },
    "stage=report": {"stage": "report"},
    "stage=align backend@alignment.backend=openai alignment.backend.base_url=http://gpu-node:8000/v1 "
    "alignment.backend.server=vllm alignment.backend.api_key_env=null": {
        **DEMO,
        "stage": "align",
        "choice:backend@alignment.backend": "openai",
        "alignment.backend.base_url": "http://gpu-node:8000/v1",
        "alignment.backend.server": "vllm",
        "alignment.backend.api_key_env": None,
        "choice:backend@truncation.judge.backend": "hf",
    },
    "ablation=granularity": {
        **DEMO,
        "sweep:truncation/granularity": ["paper_sentence", "sentence", "step", "token_chunk"],
    },
    "experiment=tiny baseline=palign,sft_long_cot": TINY,
    "experiment=paper/table1_qwen2_5_7b baseline=palign,sft_long_cot,sft_short_cot,fixed_ratio": PAPER_QWEN25,
    "experiment=paper/table1_qwen3_8b baseline=palign,sft_long_cot,sft_short_cot,fixed_ratio": PAPER_QWEN3,
    "experiment=paper/table1_qwen2_5_7b ablation=search": {
        **PAPER_QWEN25,
        "group": "ablation-search-qwen2_5_7b_instruct",
        "sweep:truncation/search": ["binary", "linear", "exhaustive"],
    },
    "stage=judge_chains baseline=palign": {**DEMO, "stage": "judge_chains", "choice:chain_judge": "local"},
    "hydra/launcher=slurm experiment=paper/table1_qwen2_5_7b stage=align":  # sbatch sizes from the recipe's trainer=gpu
    {
        **PAPER_QWEN25,
        "stage": "align",
        "choice:hydra/launcher": "slurm",
        "hydra.launcher.nodes": 1,
        "hydra.launcher.gpus_per_node": 1,
        "hydra.launcher.tasks_per_node": 1,
    },
    "hydra/launcher=slurm experiment=paper/table1_qwen2_5_7b trainer=ddp trainer.num_nodes=2 trainer.devices=8": {
        **PAPER_QWEN25,
        "choice:trainer": "ddp",
        "choice:hydra/launcher": "slurm",
        "trainer.num_nodes": 2,
        "trainer.devices": 8,
        "hydra.launcher.nodes": 2,
        "hydra.launcher.gpus_per_node": 8,
        "hydra.launcher.tasks_per_node": 8,
    },
    "experiment=tiny stage=align backend@truncation.judge.backend=ray backend@alignment.backend=ray "
    "ray.num_workers=2": {
        **TINY,
        "stage": "align",
        "choice:backend@truncation.judge.backend": "ray",
        "choice:backend@alignment.backend": "ray",
        "ray.num_workers": 2,
        "ray.address": None,
    },
    "experiment=paper/table1_qwen2_5_7b stage=align backend@truncation.judge.backend=ray "
    "backend@alignment.backend=ray ray.address=auto ray.engine=vllm ray.num_workers=16 ray.num_gpus_per_worker=1 "
    "ray.num_cpus_per_worker=4 ray.batch_size=256 alignment.chunk_size=1024": {
        **PAPER_QWEN25,
        "stage": "align",
        "choice:backend@truncation.judge.backend": "ray",
        "choice:backend@alignment.backend": "ray",
        "ray.address": "auto",
        "ray.engine": "vllm",
        "ray.num_workers": 16,
        "ray.num_gpus_per_worker": 1,
        "ray.batch_size": 256,
    },
    "experiment=paper/table1_qwen2_5_7b stage=eval backend@evaluation.backend=ray ray.address=auto ray.engine=vllm "
    "ray.num_workers=16 ray.num_gpus_per_worker=1 ray.num_cpus_per_worker=4 ray.batch_size=256": {
        **PAPER_QWEN25,
        "stage": "eval",
        "choice:backend@evaluation.backend": "ray",
        "ray.address": "auto",
        "ray.engine": "vllm",
        "ray.num_workers": 16,
        "ray.num_gpus_per_worker": 1,
    },
    "stage=judge_chains baseline=palign chain_judge=openai "
    "chain_judge.backend.base_url=https://open.bigmodel.cn/api/paas/v4 chain_judge.backend.model=glm-4.5 "
    "chain_judge.backend.api_key_env=ZHIPUAI_API_KEY": {
        "stage": "judge_chains",
        "choice:chain_judge": "openai",
        "chain_judge.backend.model": "glm-4.5",
        "chain_judge.backend.api_key_env": "ZHIPUAI_API_KEY",
    },
}


def documented_commands() -> list[str]:
    """The arguments of every `python run.py` command in the docs, continuation lines joined."""
    commands = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8").replace("\\\n", " ")
        for match in re.finditer(r"python run\.py([^`\n#|]*)", text):
            words = [w for w in shlex.split(match.group(1)) if w != "-m"]
            commands.append(" ".join(words))
    return commands


def test_every_documented_command_has_its_settings_listed_here():
    found = set(documented_commands())
    assert found - set(DOCUMENTED) == set(), "a documented command has no entry in DOCUMENTED"
    assert set(DOCUMENTED) - found == set(), "DOCUMENTED lists a command the docs no longer show"


def jobs(command: str) -> list[list[str]]:
    """One override list per multirun job: every combination of the comma-separated values."""
    choices = []
    for word in command.split():
        key, _, value = word.partition("=")
        values = value.split(",") if "," in value and "://" not in value else [value]
        choices.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*choices)] or [[]]


def check(cfg, expected: dict) -> None:
    for key, value in expected.items():
        kind, _, name = key.rpartition(":")
        if kind == "choice":
            assert cfg.hydra.runtime.choices.get(name) == value, key
        elif kind == "sweep":
            assert str(cfg.hydra.sweeper.params[name]).split(",") == value, key
        elif key == "benchmarks":
            assert sorted(k for k, v in cfg.evaluation.benchmarks.items() if v is not None) == value, key
        else:
            got = OmegaConf.select(cfg, key)
            assert got == value or (isinstance(value, float) and got == pytest.approx(value)), (
                f"{key}: {got!r} != {value!r}"
            )


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_a_documented_command_runs_what_its_text_says(command, tmp_path):
    swept = {w.split("=", 1)[0] for w in command.split() if "," in w.split("=", 1)[-1]}
    expected = {k: v for k, v in DOCUMENTED[command].items() if k.rpartition(":")[2].split(".")[0] not in swept}
    for overrides in jobs(command):
        check(compose_config(overrides, tmp_path, hydra=True), expected)
