"""`backend: openai` for every inference stage, against a real `transformers serve` on loopback.

Each stage is built as the pipeline builds it (its `from_config`, `build_judge`, `make_alignment`),
once on the in-process option (`HFBackend`) and once on an `OpenAIBackend` whose server
(tests/helpers/openai_server.py, started once per session by tests/conftest.py's fixtures) serves the model
from its folder; a `FaultProxy` in front records what reached the server. Under greedy decoding the
two give the same results: the judge's replies and verdicts (and stage 1's prefixes), the
continuations, the benchmark predictions. What a `transformers` server cannot do, the judge's logits
mode, is refused before any request, by `build_judge` and by the preflight, as is an `openai` option
without its server's URL.

The model is the tiny random Llama with larger random weights (`varied`): the tiny model itself
answers every prompt with the same run of newlines, so equal replies would not show that each
prompt reached the server as the in-process back end renders it. Each back end writes its stage
artifacts under a cache of its own: a stage's store is keyed by its model, not by where it ran
(palign/llm/openai_backend.py: OpenAIBackend), so a shared cache would hand the second back end the
first one's results.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from palign.alignment.continuation import PrefixContinuation, continuation_prompt
from palign.evaluation.harness import evaluate_student
from palign.llm.generation import SamplingConfig
from palign.llm.hf_backend import HFBackend
from palign.llm.models import ModelSpec
from palign.llm.openai_backend import OpenAIBackend, OpenAIChatBackend
from palign.preflight import inference_problems
from palign.schema import Grading, Intervals, Judge, JudgePrompt, Remote, defaults
from palign.teachers.records import TeacherRecord
from palign.tracking import Tracker
from palign.truncation.judge import AbsoluteThreshold
from palign.truncation.prefixes import AdaptivePrefix
from palign.truncation.search import BinaryPrefixSearch
from palign.truncation.stage import PrefixTruncation, build_judge
from palign.truncation.units import Sentences
from tests.conftest import PROJECT_ROOT, compose_config, stage_cache

PROMPTS = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "prompts" / "paper.yaml"))
JUDGE_PROMPT = JudgePrompt(
    **OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "truncation" / "judge_prompt" / "paper.yaml"))
)
# greedy, 2 prompts per in-process batch (the server gets one request per prompt)
GREEDY = asdict(SamplingConfig(max_new_tokens=8, do_sample=False, repetition_penalty=1.0, num_samples=1, batch_size=2))
RECORDS = [
    TeacherRecord(
        id=f"p{i}",
        question=f"What is {i} + {i * i}?" + " Think." * i,
        answer=str(i + i * i),
        long_cot=" ".join(f"Step {j}: we compute {j} + {i} = {i + j}." for j in range(1, 4 + i)),
    )
    for i in range(3)
]
PREFIXES = {r.id: f"We add {i} and {i * i}." for i, r in enumerate(RECORDS)}
NOWHERE = "http://127.0.0.1:9/v1"  # the discard port: no server


@pytest.fixture(scope="module")
def varied(tmp_path_factory, tiny_path) -> dict:
    """The tiny model's folder with its 2-D weights drawn again at std 0.3 (seeded): greedy replies that
    differ from prompt to prompt. A `local` model, which the server knows by its folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-varied"
    shutil.copytree(tiny_path, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)
    return {"name": "tiny_varied", "source": "local", "pretrained": str(folder)}


def served_option(base_url: str) -> OpenAIBackend:
    """`backend: openai` on transformers serve, without a key, at the schema's Remote defaults otherwise
    (`model` null: the stage's model names itself, its folder)."""
    return OpenAIBackend(**defaults(Remote, base_url=base_url, api_key_env=None, server="transformers"))


def distinct(texts) -> bool:
    return len(set(texts)) == len(texts)


def user_turns(proxy_server) -> list[str]:
    return [body["messages"][0]["content"] for body in proxy_server.bodies("/v1/chat/completions")]


# -- stage 2: the continuation ----------------------------------------------------------------------
def test_continuations_through_transformers_serve_equal_the_in_process_ones(proxy, varied, tiny_tokenizer, tmp_path):
    def continuation(cache, backend) -> PrefixContinuation:
        return PrefixContinuation.from_config(
            varied,
            "none",
            backend,
            GREEDY,
            2,
            asdict(Grading(workers=0)),
            prompts=PROMPTS,
            cache_dir=stage_cache(cache),
            tokenizer=tiny_tokenizer,
        )

    local = continuation(tmp_path / "hf", HFBackend())
    stage = continuation(tmp_path / "openai", served_option(proxy.base_url))
    assert isinstance(stage.backend, OpenAIChatBackend) and stage.backend.model == varied["pretrained"]
    assert stage.folder.name == local.folder.name  # the same artifact, whichever back end computed it

    rows = stage.run(RECORDS, PREFIXES)
    strip = lambda rs: [(r["id"], r["prefix"], r["continuation"], r["tokens"], r["finished"]) for r in rs]  # noqa: E731
    assert strip(rows) == strip(local.run(RECORDS, PREFIXES))
    assert distinct([r["continuation"] for r in rows]) and all(r["tokens"] == 8 for r in rows)
    assert stage(RECORDS, PREFIXES) == {r["id"]: r["continuation"] for r in rows}  # filter none: every one kept
    # one request per continuation, its user turn as the stage renders it
    assert sorted(user_turns(proxy)) == sorted(
        continuation_prompt(PROMPTS, r.question, PREFIXES[r.id]) for r in RECORDS
    )


# -- stage 4: evaluation ----------------------------------------------------------------------------
def test_evaluation_through_transformers_serve_predicts_what_the_in_process_student_does(
    proxy, varied, cache_dir, tmp_path
):
    bench = tmp_path / "toy.jsonl"
    problems = [
        {"problem": f"Compute {i} * {i + 2}." + " Show work." * i, "answer": str(i * (i + 2))} for i in range(3)
    ]
    bench.write_text("".join(json.dumps(problem) + "\n" for problem in problems))
    benchmarks = {"toy": {"name": "toy", "local_path": str(bench), "limit": None, "exclude_training": False}}

    def evaluated(name: str, backend) -> tuple[dict, list[dict]]:
        run_dir = tmp_path / name
        tracker = Tracker("none", run_dir, name, name, "test", "eval", project="palign", entity=None, mode="offline")
        summary = evaluate_student(
            benchmarks,
            None,
            None,
            backend,
            GREEDY,
            1,
            asdict(Grading(workers=0)),
            2,
            student=varied,
            method="palign",
            prompts=PROMPTS,
            cache_dir=cache_dir,
            run_dir=run_dir,
            trained=run_dir / "student",
            training_ids=lambda: pytest.fail("no benchmark holds out training problems"),
            tracker=tracker,
            intervals=asdict(Intervals(resamples=100)),
        )
        (predictions,) = (run_dir / "eval").glob("*/toy.jsonl")
        return summary, [json.loads(line) for line in predictions.read_text().splitlines()]

    local_summary, local = evaluated("hf", HFBackend())
    served_summary, predicted = evaluated("openai", served_option(proxy.base_url))
    strip = lambda rows: [(r["id"], r["output"], r["tokens"], r["finished"]) for r in rows]  # noqa: E731
    assert strip(predicted) == strip(local) and [r["id"] for r in predicted] == ["0", "1", "2"]
    assert distinct([r["output"][0] for r in predicted])
    assert served_summary["benchmarks"] == local_summary["benchmarks"]
    assert len(user_turns(proxy)) == 3  # every prediction came from the server


# -- stage 1: the sufficiency judge ---------------------------------------------------------------------
def judge_node(spec: dict, backend, mode: str = "generate") -> Judge:
    """The `truncation.judge` node of `spec` (8 reply tokens, batch 2; the schema's defaults otherwise)."""
    return Judge(
        **{
            **defaults(Judge),
            "model": ModelSpec.from_config(spec),
            "mode": mode,
            "max_new_tokens": 8,
            "batch_size": 2,
            "backend": backend,
            "threshold": AbsoluteThreshold(value=0.0),
        }
    )


def test_the_generate_mode_judge_through_transformers_serve_equals_the_in_process_judge(
    proxy, varied, tiny_tokenizer, cache_dir, tmp_path
):
    option = served_option(proxy.base_url)
    local = build_judge(judge_node(varied, HFBackend()), JUDGE_PROMPT, cache_dir, HFBackend())
    judge = build_judge(judge_node(varied, option), JUDGE_PROMPT, cache_dir, option)
    assert isinstance(judge.scorer, OpenAIChatBackend) and judge.context_tokens == local.context_tokens
    pairs = [(r.question, PREFIXES[r.id]) for r in RECORDS]
    verdicts = judge.judge(pairs)
    assert [(v.sufficient, v.reply) for v in verdicts] == [(v.sufficient, v.reply) for v in local.judge(pairs)]
    assert distinct([v.reply for v in verdicts]) and len(user_turns(proxy)) == len(pairs)

    # stage 1 as the pipeline builds it: the same probes, verdicts and prefixes on either back end
    def truncation(cache, backend) -> PrefixTruncation:
        return PrefixTruncation.from_config(
            granularity=Sentences(),
            search=BinaryPrefixSearch,
            judge=judge_node(varied, backend),
            judge_prompt=JUDGE_PROMPT,
            chunk_size=2,
            prefix=AdaptivePrefix(),
            cache_dir=stage_cache(cache),
            tokenizer=tiny_tokenizer,
        )

    proxy.reset()
    rows = truncation(tmp_path / "openai", option).run(RECORDS)
    assert rows == truncation(tmp_path / "hf", HFBackend()).run(RECORDS)
    assert len(user_turns(proxy)) == sum(len(r["probes"]) for r in rows) > 0


def test_the_logits_mode_judge_is_refused_on_transformers_serve_before_any_request(varied, cache_dir, tmp_path):
    # nothing listens at NOWHERE: a request would fail with a connection error, not this refusal
    option = served_option(NOWHERE)
    refusal = (
        r"truncation.judge.mode=logits .*transformers serve \(server: transformers\)"
        r".*use truncation.judge.mode=generate"
    )
    with pytest.raises(ValueError, match=refusal):
        build_judge(judge_node(varied, option, mode="logits"), JUDGE_PROMPT, cache_dir, option)

    # the preflight refuses the composed run before anything loads
    judged = [
        "experiment=tiny",
        "truncation/judge=self",
        "backend@truncation.judge.backend=openai",
        "truncation.judge.backend.server=transformers",
        f"truncation.judge.backend.base_url={NOWHERE}",
        "truncation.judge.backend.api_key_env=null",
    ]
    cfg = compose_config(judged, tmp_path)
    assert cfg.truncation.judge.mode == "logits"
    (problem,) = inference_problems(cfg, hardware=False)
    assert problem.startswith("truncation.judge.backend: ") and re.search(refusal, problem)
    generate = compose_config([*judged, "truncation.judge.mode=generate"], tmp_path)
    assert inference_problems(generate, hardware=False) == []

    # an openai option without its server's URL, named by its key
    unset = compose_config(["experiment=tiny", "backend@alignment.backend=openai"], tmp_path)
    assert inference_problems(unset, hardware=False) == [
        "alignment.backend.base_url: the server's API root is not set (e.g. alignment.backend.base_url=http://HOST:8000/v1)"
    ]


# -- the composed config ------------------------------------------------------------------------------
def test_the_composed_alignment_stage_runs_on_the_server_it_names(proxy, tiny_path, tiny_tokenizer, tmp_path):
    from palign.pipeline import RunContext, make_alignment

    def stage(overrides: list[str], name: str) -> PrefixContinuation:
        cfg = compose_config(
            ["experiment=tiny", "baseline=palign", "alignment.sampling.do_sample=false", *overrides], tmp_path / name
        )
        ctx = RunContext(cfg=cfg, run_id="test", run_dir=tmp_path / name / "run", cache_dir=Path(cfg.paths.cache_dir))
        return make_alignment(ctx, tiny_tokenizer)

    served_stage = stage(
        [
            "backend@alignment.backend=openai",
            f"alignment.backend.base_url={proxy.base_url}",
            "alignment.backend.server=transformers",
            "alignment.backend.api_key_env=null",
            f"alignment.backend.model='{tiny_path}'",
        ],
        "openai",
    )
    backend = served_stage.backend
    assert isinstance(backend, OpenAIChatBackend) and proxy.requests == []  # built, nothing sent
    assert (backend.base_url, backend.model, backend.server.name, backend.api_key_env) == (
        proxy.base_url,
        tiny_path,
        "transformers",
        None,
    )
    assert backend.max_concurrency == defaults(Remote)["max_concurrency"]  # the schema's default

    # the stage's sampling (the schema's repetition penalty among it) travels with each request: the same continuations
    rows = served_stage.run(RECORDS[:2], PREFIXES)
    local = stage([], "hf").run(RECORDS[:2], PREFIXES)
    strip = lambda rs: [(r["id"], r["continuation"], r["tokens"]) for r in rs]  # noqa: E731
    assert strip(rows) == strip(local)
    sent = [json.loads(body["generation_config"]) for body in proxy.bodies("/v1/chat/completions")]
    assert len(sent) == 2 and all(
        (g["do_sample"], g["max_new_tokens"], g["repetition_penalty"]) == (False, 8, 1.05) for g in sent
    )
