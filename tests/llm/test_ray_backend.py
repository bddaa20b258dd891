"""backend=ray: judge, continuation and evaluation sharded across 2 Ray Data actors on a local cluster.

One local Ray cluster per module (2 CPUs and 2 declared GPUs on a node whose CUDA_VISIBLE_DEVICES
names both, its temporary folder under pytest's), the tiny random model: results equal the
in-process path's under greedy decoding (the judge: the same verdicts, scores and prefixes), an
interrupted stage resumes without recomputing or duplicating a stored record, a failing worker is
reported by name, each actor sees exactly the GPUs it asked for, a request whose workers cannot
hold their engine is refused before Ray starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

import pytest
from omegaconf import OmegaConf

from palign.alignment.continuation import AlignmentSettings, PrefixContinuation
from palign.evaluation.harness import evaluate
from palign.llm.backends import ChatBackendError
from palign.llm.chat import encode_user_turn
from palign.llm.generation import SamplingConfig
from palign.llm.hf_backend import HFBackend
from palign.llm.models import ModelSpec, load_inference_model, load_tokenizer
from palign.schema import Judge, JudgePrompt, Ray, defaults
from palign.teachers.records import TeacherRecord
from palign.truncation.judge import QuantileThreshold
from palign.truncation.prefixes import AdaptivePrefix
from palign.truncation.search import BinaryPrefixSearch
from palign.truncation.stage import PrefixTruncation, build_judge
from palign.truncation.units import Sentences
from tests.conftest import PROJECT_ROOT, compose_config, stage_cache

ray = pytest.importorskip("ray", reason="pip install 'palign[ray]'")
from palign.llm.ray_backend import (  # noqa: E402 (imports ray: only after the importorskip above)
    ActorWorker,
    RayBackend,
    RayChatBackend,
    check_gpu_request,
    check_nodes_hold_a_worker,
    stream_through_actors,
)
from palign.truncation.ray_judge import RayJudgePool  # noqa: E402

# the tests marked slow start a Ray cluster (~10-30 s on 2 shared cores) whose actors load the model

PROMPTS = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "prompts" / "paper.yaml"))
GREEDY = {
    "max_new_tokens": 8,
    "do_sample": False,
    "repetition_penalty": 1.0,
    "num_samples": 1,
    "batch_size": 2,
    "seed": 0,
}
RECORDS = [
    TeacherRecord(id=f"p{i}", question=f"What is {i} + {i * i}?" + " Think." * i, answer=str(i + i * i), long_cot="...")
    for i in range(5)
]
PREFIXES = {r.id: f"We add {i} and {i * i}." for i, r in enumerate(RECORDS)}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray puts AF_UNIX sockets under its temp folder, whose paths may not exceed 107 bytes: under a
    # deep pytest folder (CI's fresh TMPDIR) Ray fails to start. Then a short folder of its own in
    # /tmp, removed afterwards.
    temp = tmp_path_factory.mktemp("ray")
    short = None
    if len(str(temp)) > 40:
        short = tempfile.mkdtemp(prefix="palign-ray-", dir="/tmp")
        temp = short
    # the node has 2 GPUs (declared: Ray assigns their ids without touching a device) and, like a
    # GPU node where a scheduler set it, a CUDA_VISIBLE_DEVICES naming both, which the raylet and
    # its workers inherit; the driver's own is restored at once
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
    try:
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=str(temp), log_to_driver=False)
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        yield
    finally:
        ray.shutdown()
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(student_specs, cache_dir):
    spec = OmegaConf.to_container(student_specs["tiny_random"])
    return spec, load_tokenizer(spec, cache_dir)


SETTINGS = dict(num_workers=2, num_cpus_per_worker=1, num_gpus_per_worker=0, engine="hf", address=None, batch_size=2)


def ray_backend(spec, cache_dir, tokenizer, kind=RayChatBackend, **kw) -> RayChatBackend:
    """2 workers, 2 prompts (one generation batch) per worker call, on the module's cluster."""
    return kind(
        dict(ModelSpec.from_config(spec).__dict__), cache_dir, tokenizer, **{"stage": "alignment", **SETTINGS, **kw}
    )


def continuation(folder, spec, tokenizer, cache_dir, backend=None, chunk_size=3) -> PrefixContinuation:
    settings = AlignmentSettings(
        model_identity=ModelSpec.from_config(spec).identity(),
        prompts=PROMPTS,
        sampling=GREEDY,
        filter="none",
        chunk_size=chunk_size,
        grading_workers=0,
        grading_timeout_s=5.0,
        chat_template_kwargs={},
    )
    return PrefixContinuation(
        settings, folder, lambda: load_inference_model(spec, cache_dir), tokenizer, progress=False, backend=backend
    )


@pytest.mark.slow
def test_continuation_over_ray_equals_in_process_and_resumes(ray_cluster, tiny, cache_dir, tmp_path):
    spec, tokenizer = tiny
    expected = continuation(stage_cache(tmp_path / "hf"), spec, tokenizer, cache_dir).run(RECORDS, PREFIXES)
    assert len(expected) == 5 and any(row["continuation"] for row in expected)

    stored_before_kill: list[int] = []

    class Interrupted(RayChatBackend):
        """The driver is 'killed' after the first 3 replies came back (one chunk_size to store)."""

        def stream(self, user_texts, sampling, progress=None):
            for n, reply in enumerate(super().stream(user_texts, sampling, progress), start=1):
                yield reply
                if n == 3:
                    stored_before_kill.append(n)
                    raise KeyboardInterrupt

    folder = stage_cache(tmp_path / "ray")
    with pytest.raises(KeyboardInterrupt):
        continuation(folder, spec, tokenizer, cache_dir, ray_backend(spec, cache_dir, tokenizer, Interrupted)).run(
            RECORDS, PREFIXES
        )
    assert stored_before_kill == [3]
    first = [json.loads(line)["key"] for line in next(folder.rglob("records.jsonl")).read_text().splitlines()]
    assert len(first) == 3

    resumed_texts: list[str] = []

    class Counting(RayChatBackend):
        def stream(self, user_texts, sampling, progress=None):
            resumed_texts.extend(user_texts)
            yield from super().stream(user_texts, sampling, progress)

    stage = continuation(folder, spec, tokenizer, cache_dir, ray_backend(spec, cache_dir, tokenizer, Counting))
    rows = stage.run(RECORDS, PREFIXES)
    # nothing finished is recomputed; the missing prompts go to one actor pool in one call
    assert len(resumed_texts) == 2 and stage.backend.calls == 1
    assert stage.generated == 2
    stored = [json.loads(line) for line in (stage.folder / "records.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in stored) == sorted(r["key"] for r in rows)  # nothing duplicated
    assert not set(first) & {r["key"] for r in stored[3:]}
    # equal to the in-process continuations, text and token counts
    strip = lambda rs: [(r["id"], r["continuation"], r["tokens"], r["finished"]) for r in rs]  # noqa: E731
    assert strip(rows) == strip(expected)

    # everything stored: a rerun neither starts Ray nor loads a model
    class Untouchable(RayChatBackend):
        def _connect(self):
            pytest.fail("Ray started although every record is stored")

    again = continuation(folder, spec, tokenizer, cache_dir, ray_backend(spec, cache_dir, tokenizer, Untouchable))
    assert strip(again.run(RECORDS, PREFIXES)) == strip(expected) and again.generated == 0


@pytest.mark.slow
def test_evaluation_over_ray_equals_in_process(ray_cluster, tiny, cache_dir, tmp_path):
    spec, tokenizer = tiny
    bench = tmp_path / "toy.jsonl"
    bench.write_text(
        "".join(
            json.dumps({"problem": f"Compute {i} * {i + 2}." + " Show work." * (i % 3), "answer": str(i * (i + 2))})
            + "\n"
            for i in range(5)
        )
    )
    benchmarks = {"toy": {"name": "toy", "local_path": str(bench)}}

    def run(out, backend):
        return evaluate(
            lambda: load_inference_model(spec, cache_dir),
            ModelSpec.from_config(spec).identity(),
            tokenizer,
            benchmarks,
            GREEDY,
            PROMPTS,
            out,
            chat_template_kwargs={},
            grading_workers=0,
            grading_timeout_s=5,
            chunk_size=4,
            backend=backend,
        )["toy"]

    local = run(tmp_path / "hf", None)
    distributed = run(tmp_path / "ray", ray_backend(spec, cache_dir, tokenizer, stage="evaluation"))
    assert [(r["id"], r["output"], r["tokens"]) for r in distributed.rows] == [
        (r["id"], r["output"], r["tokens"]) for r in local.rows
    ]
    assert distributed.summary == local.summary


@pytest.mark.slow
def test_sampling_over_ray_does_not_depend_on_the_number_of_workers(ray_cluster, tiny, cache_dir):
    spec, tokenizer = tiny
    sampling = {**GREEDY, "do_sample": True, "temperature": 1.0, "top_p": 0.95, "seed": 3}
    texts = [f"Name a number above {i}." for i in range(4)]
    one = ray_backend(spec, cache_dir, tokenizer, num_workers=1, batch_size=4).complete(texts, sampling)
    two = ray_backend(spec, cache_dir, tokenizer, num_workers=2, batch_size=2).complete(texts, sampling)
    assert [[g.text for g in gens] for gens in one] == [[g.text for g in gens] for gens in two]
    other_seed = ray_backend(spec, cache_dir, tokenizer).complete(texts, {**sampling, "seed": 4})
    assert [[g.text for g in gens] for gens in other_seed] != [[g.text for g in gens] for gens in one]


@pytest.mark.slow
def test_a_failing_worker_is_reported_with_the_stage_and_the_worker(ray_cluster, tiny, cache_dir, tmp_path):
    _, tokenizer = tiny
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    backend = RayChatBackend(
        {"name": "broken", "source": "local", "pretrained": str(not_a_model)},
        cache_dir,
        tokenizer,
        stage="alignment (prefix continuation)",
        **SETTINGS,
    )
    with pytest.raises(
        ChatBackendError,
        match=r"alignment \(prefix continuation\): a Ray worker failed .*ray worker pid \d+ on .*broken",
    ):
        backend.complete(["What is 1 + 1?"], GREEDY)
    # a folder that does not exist fails on the driver, before any actor starts
    missing = RayChatBackend(
        {"name": "gone", "source": "local", "pretrained": str(tmp_path / "nowhere")}, cache_dir, tokenizer, **SETTINGS
    )
    with pytest.raises(FileNotFoundError, match="no model folder"):
        missing.complete(["What is 1 + 1?"], GREEDY)


def test_the_composed_config_builds_a_ray_stage_without_starting_ray(tmp_path, monkeypatch, smollm2_tokenizer):
    from hydra.utils import instantiate

    cfg = compose_config(
        [
            "experiment=tiny",
            "baseline=palign",
            "backend@alignment.backend=ray",
            "ray.num_workers=3",
            "ray.address=ray://head:10001",
        ],
        tmp_path,
    )
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before any work"))
    stage = instantiate(
        cfg.alignment,
        _convert_="all",
        prompts=OmegaConf.to_container(cfg.prompts, resolve=True),
        cache_dir=str(stage_cache(tmp_path)),
        tokenizer=smollm2_tokenizer,
    )
    backend = stage.backend
    assert isinstance(backend, RayChatBackend) and backend.stage.startswith("alignment")
    assert (backend.num_workers, backend.address, backend.engine) == (3, "ray://head:10001", "hf")
    assert backend.complete([], cfg.alignment.sampling) == [] and not backend.started_ray


def test_the_ray_back_end_changes_neither_the_run_identity_nor_the_stage_fingerprints(tmp_path):
    from palign.runs import run_identity

    base = compose_config(["baseline=palign"], tmp_path)
    distributed = compose_config(
        [
            "baseline=palign",
            "backend@truncation.judge.backend=ray",
            "backend@alignment.backend=ray",
            "backend@evaluation.backend=ray",
            "ray.num_workers=4",
            "ray.num_gpus_per_worker=1",
            "ray.engine=vllm",
            "ray.address=auto",
            "ray.batch_size=64",
        ],
        tmp_path,
    )
    assert run_identity(distributed) == run_identity(base)
    # one `ray:` block, which every stage's ray option reads
    assert distributed.alignment.backend.workers.num_workers == distributed.evaluation.backend.workers.num_workers == 4
    assert distributed.truncation.judge.backend.workers.num_workers == 4
    generated = ["teacher=generate", "backend@teacher.source.backend=ray", "ray.num_workers=4"]
    assert run_identity(compose_config(generated, tmp_path)) == run_identity(
        compose_config(["teacher=generate"], tmp_path)
    )
    assert compose_config(generated, tmp_path).teacher.source.backend.workers.num_workers == 4


# -- the sufficiency judge over Ray ---------------------------------------------------------------
JUDGE_PROMPT = JudgePrompt(
    **OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/truncation/judge_prompt/paper.yaml"))
)
TRACES = [
    TeacherRecord(
        id=f"t{i}",
        question=f"What is {i} + 3?",
        answer=str(i + 3),
        long_cot=" ".join(f"Step {j}: we compute {j} + {i} = {i + j}." for j in range(1, 4 + i)),
    )
    for i in range(5)
]


def judge_node(spec, vllm=None, **ray) -> Judge:
    """The `truncation.judge` node of `spec` (logits, batch 4, the schema's defaults otherwise) with the quantile
    threshold (the calibration goes through the pool too), on the Ray option with the `ray:` block SETTINGS but
    `ray` (and the `vllm:` settings `vllm`)."""
    return Judge(
        **{
            **defaults(Judge),
            "model": ModelSpec.from_config(spec),
            "max_new_tokens": 8,
            "batch_size": 4,
            "backend": RayBackend(workers=Ray(**{**SETTINGS, **ray}), vllm=vllm or {}),
            "threshold": QuantileThreshold(value=0.5, calibration_examples=2),
        }
    )


def judge_stage(folder, tokenizer, node: Judge, **judging) -> PrefixTruncation:
    """Stage 1 with the judge `node`: binary search over sentences, 2 traces per chunk."""
    return PrefixTruncation(
        AdaptivePrefix(),
        Sentences(),
        folder,
        tokenizer,
        chunk_size=2,
        search=BinaryPrefixSearch,
        judge=node,
        judge_prompt=JUDGE_PROMPT,
        progress=False,
        **judging,
    )


def searched(rows) -> list:
    """What the search decided per trace, scores to float tolerance (other torch thread counts)."""
    return [
        (r["id"], r["chosen_k"], r["fallback"], [(p["k"], p["sufficient"], round(p["score"], 4)) for p in r["probes"]])
        for r in rows
    ]


@pytest.mark.slow
def test_the_judge_over_ray_equals_in_process_and_resumes(ray_cluster, tiny, cache_dir, tmp_path):
    spec, tokenizer = tiny
    node = judge_node(spec, batch_size=1)
    local = judge_stage(
        stage_cache(tmp_path / "hf"),
        tokenizer,
        node,
        judge_factory=lambda: build_judge(node, JUDGE_PROMPT, cache_dir, HFBackend()),
    )
    expected = local.run(TRACES)
    assert len(expected) == 5 and {r["chosen_k"] for r in expected} != {
        r["m"] for r in expected
    }  # prefixes, not all fallbacks

    class Interrupted(RayJudgePool):
        """The driver is 'killed' after the first chunk (2 traces) came back and was stored."""

        def search(self, chunks, quantile_threshold):
            for position, outcomes in super().search(chunks, quantile_threshold):
                yield position, outcomes
                raise KeyboardInterrupt

    def pool(kind=RayJudgePool):
        return kind(node, JUDGE_PROMPT, cache_dir, node.backend, BinaryPrefixSearch)

    folder = stage_cache(tmp_path / "ray")
    with pytest.raises(KeyboardInterrupt):
        judge_stage(folder, tokenizer, node, judge_pool=pool(Interrupted)).run(TRACES)
    store = next(folder.rglob("records.jsonl"))
    first = [json.loads(line)["key"] for line in store.read_text().splitlines()]
    assert len(first) == 2
    calibration = json.loads(next(folder.rglob("calibration.json")).read_text())
    assert calibration["threshold"] == pytest.approx(
        json.loads(next(local.folder.glob("calibration.json")).read_text())["threshold"], abs=1e-4
    )

    sent: list[int] = []

    class Counting(RayJudgePool):
        def search(self, chunks, quantile_threshold):
            sent.extend(len(questions) for questions, _ in chunks)
            yield from super().search(chunks, quantile_threshold)

    stage = judge_stage(folder, tokenizer, node, judge_pool=pool(Counting))
    rows = stage.run(TRACES)
    # only the 3 unstored traces go out, in one actor pool (calibration was stored before)
    assert sum(sent) == 3 and stage.judge_pool.calls == 1
    stored = [json.loads(line)["key"] for line in store.read_text().splitlines()]
    assert sorted(stored) == sorted(r["key"] for r in rows) and not set(first) & set(stored[2:])  # nothing duplicated
    assert searched(rows) == searched(expected)
    assert [r["prefix"] for r in rows] == [r["prefix"] for r in expected]
    assert stage.judge_calls == sum(len(r["probes"]) for r in rows if r["key"] not in first)

    # everything stored: a rerun starts no Ray and builds no judge
    class Untouchable(RayJudgePool):
        def _stream(self, payloads, num_workers):
            pytest.fail("Ray started although every trace is stored")

    again = judge_stage(folder, tokenizer, node, judge_pool=pool(Untouchable))
    assert searched(again.run(TRACES)) == searched(expected)


@pytest.mark.slow
def test_a_judge_worker_that_cannot_load_its_model_is_reported(ray_cluster, tiny, cache_dir, tmp_path):
    spec, tokenizer = tiny
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    bad = {"name": "broken", "source": "local", "pretrained": str(broken)}
    stage = judge_stage(
        stage_cache(tmp_path),
        tokenizer,
        judge_node(spec),
        judge_pool=RayJudgePool(judge_node(bad), JUDGE_PROMPT, cache_dir, judge_node(bad).backend, BinaryPrefixSearch),
    )
    with pytest.raises(
        ChatBackendError,
        match=r"truncation \(sufficiency judge\): a Ray worker failed .*ray worker pid \d+ on .*broken",
    ):
        stage.run(TRACES)


def test_the_composed_config_builds_a_ray_judge_without_starting_ray(tmp_path, monkeypatch, smollm2_tokenizer):
    from palign.pipeline import RunContext, make_truncation

    cfg = compose_config(
        [
            "experiment=tiny",
            "baseline=palign",
            "backend@truncation.judge.backend=ray",
            "ray.num_workers=3",
            "ray.address=auto",
        ],
        tmp_path,
    )
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before any work"))
    ctx = RunContext(cfg=cfg, run_id="test", run_dir=tmp_path / "run", cache_dir=stage_cache(tmp_path))
    stage = make_truncation(ctx, smollm2_tokenizer)
    assert isinstance(stage.judge_pool, RayJudgePool) and stage.judge_factory is None
    assert (stage.judge_pool.ray["num_workers"], stage.judge_pool.ray["address"]) == (3, "auto")
    assert stage.run([]) == [] and not stage.judge_pool.started_ray


@pytest.mark.slow
def test_teacher_generation_over_ray_equals_in_process(ray_cluster, tiny, cache_dir, tmp_path, shared_data):
    from palign.teachers.sources import GeneratedTeacher

    spec, _ = tiny

    def generated(folder, backend) -> list[dict]:
        """The stored generations (the tiny model's greedy traces are blank lines, which `load` then
        counts as empty traces: the store is where the generations are compared)."""
        teacher = GeneratedTeacher.with_defaults(
            model=spec,
            problems={"kind": "file", "path": str(shared_data / "problems" / "math_train.json")},
            sampling=GREEDY,
            cache_dir=str(stage_cache(folder)),
            prompts=PROMPTS,
            problem_limit=4,
            only_correct=False,
            grading_workers=0,
            backend=RayBackend(workers=SETTINGS, vllm={}) if backend == "ray" else HFBackend(),
        )
        if backend == "ray":
            assert isinstance(teacher._model_backend(ModelSpec.from_config(spec)), RayChatBackend)
        teacher.load()
        (store,) = (folder / "cache" / "teacher_generation").glob("*/records.jsonl")
        return sorted((json.loads(line) for line in store.read_text().splitlines()), key=lambda row: row["id"])

    expected = generated(tmp_path / "hf", "hf")
    assert len(expected) == 4 and all(row["trace"] for row in expected)
    assert generated(tmp_path / "ray", "ray") == expected


@pytest.mark.slow
def test_ray_workers_sample_with_the_configured_parameters_only(ray_cluster, tiny, cache_dir, tmp_path, tiny_model):
    """A model whose generation_config.json ships top_k 20, a repetition penalty, an n-gram ban, ...
    samples on Ray workers exactly as the same weights with a plain one (tests/llm/test_sampling_params.py)."""
    from tests.llm.test_sampling_params import MODEL_DEFAULTS

    spec, tokenizer = tiny
    plain, opinionated = tmp_path / "plain", tmp_path / "opinionated"
    for folder in (plain, opinionated):
        tiny_model.save_pretrained(folder)
    shipped = json.loads((opinionated / "generation_config.json").read_text())
    (opinionated / "generation_config.json").write_text(json.dumps({**shipped, **MODEL_DEFAULTS}))
    sampling = {
        **GREEDY,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": None,
        "num_samples": 2,
        "max_new_tokens": 6,
        "seed": 5,
    }
    texts = [f"Name a number above {i}." for i in range(4)]
    outputs = [
        [
            [g.text for g in gens]
            for gens in ray_backend(spec, cache_dir, tokenizer, weights=str(folder)).complete(texts, sampling)
        ]
        for folder in (plain, opinionated)
    ]
    assert outputs[0] == outputs[1] and len({text for gens in outputs[0] for text in gens}) > 1


# -- GPUs: each actor sees exactly the GPUs it asked for -----------------------------------------
def gpu_probe() -> type:
    """An actor that reports what it sees: its CUDA_VISIBLE_DEVICES when built (before its constructor
    could touch CUDA), the GPU ids Ray assigned it, whether torch had initialised CUDA by then. A
    class made here (not importable by name) travels to the actors by value."""

    class GPUProbe(ActorWorker):
        def build(self) -> None:
            import torch

            self.seen = {
                "pid": os.getpid(),
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "assigned": sorted(str(i) for i in ray.get_gpu_ids()),
                "cuda_initialized": torch.cuda.is_initialized(),
            }

        def handle(self, request):
            time.sleep(request["sleep"])  # the other actor takes the next payload meanwhile
            return self.seen

    return GPUProbe


def actors_seen(num_gpus_per_worker: float) -> dict[int, dict]:
    """What each of 2 probe actors saw (by pid), through the pool every stage uses."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.wait_for_min_actors_s
    # both actors are up before the first payload goes out, so the least busy one takes each: both report
    context.wait_for_min_actors_s = 300
    try:
        results = stream_through_actors(
            [json.dumps({"sleep": 1.0})] * 4,
            gpu_probe(),
            {"num_threads": 0},
            num_workers=2,
            num_cpus_per_worker=1,
            num_gpus_per_worker=num_gpus_per_worker,
            payloads_per_call=1,
            stage="probe",
            describe="gpu probe",
        )
        return {seen["pid"]: seen for _, seen in results}
    finally:
        context.wait_for_min_actors_s = before


@pytest.mark.slow
def test_an_actor_that_asks_for_no_gpu_sees_none(ray_cluster):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES as the node had it ("0,1") for an actor it assigned no GPU;
    every such actor would put its model on GPU 0."""
    seen = actors_seen(0)
    assert len(seen) == 2
    for actor in seen.values():
        assert (actor["visible"], actor["assigned"], actor["cuda_initialized"]) == ("", [], False)


@pytest.mark.slow
def test_an_actor_that_asks_for_one_gpu_sees_its_own(ray_cluster):
    seen = actors_seen(1)
    assert len(seen) == 2
    for actor in seen.values():
        assert actor["visible"] == ",".join(actor["assigned"]) and len(actor["assigned"]) == 1
        assert not actor["cuda_initialized"]
    assert sorted(actor["visible"] for actor in seen.values()) == ["0", "1"]  # distinct GPUs


@pytest.mark.slow
def test_a_worker_no_node_can_hold_is_refused_before_any_actor_starts(ray_cluster, tiny, cache_dir):
    spec, tokenizer = tiny
    for engine, vllm in (("hf", None), ("vllm", {"tensor_parallel_size": 3})):
        backend = ray_backend(spec, cache_dir, tokenizer, engine=engine, vllm=vllm, num_gpus_per_worker=3)
        with pytest.raises(
            ChatBackendError,
            match=r"alignment: each Ray worker asks for 3 GPU but no node of the cluster "
            r"at local has them \(the largest has 2\.0, 2\.0 in all over 1 node\); "
            r"lower ray\.num_gpus_per_worker",
        ):
            backend.complete(["What is 1 + 1?"], GREEDY)
        assert backend.calls == 0  # no actor pool was started


def test_an_actor_lives_on_one_node_so_one_node_must_hold_a_worker():
    """Two nodes of 1 GPU each hold 2 GPUs in all, but no worker of 2 GPUs: Ray would leave it pending."""
    two_nodes = [{"CPU": 8.0, "GPU": 1.0, "memory": 1e9}, {"CPU": 8.0, "GPU": 1.0, "memory": 1e9}]
    check_nodes_hold_a_worker(two_nodes, 4, 1, "auto", "evaluation")
    with pytest.raises(
        ChatBackendError,
        match=r"evaluation: each Ray worker asks for 2 GPU but no node of the cluster at "
        r"auto has them \(the largest has 1\.0, 2\.0 in all over 2 nodes\)",
    ):
        check_nodes_hold_a_worker(two_nodes, 4, 2, "auto", "evaluation")
    # enough CPUs on one node, enough GPUs on another: neither holds the worker
    split = [{"CPU": 16.0}, {"CPU": 2.0, "GPU": 8.0}]
    with pytest.raises(
        ChatBackendError, match="asks for 4 CPU and 1 GPU on one node, but no node of the cluster at auto has both"
    ):
        check_nodes_hold_a_worker(split, 4, 1, "auto", "evaluation")
    with pytest.raises(ChatBackendError, match="asks for 1 CPU but no node"):
        check_nodes_hold_a_worker([], 1, 0, "auto", "evaluation")


# -- vLLM workers: whole GPUs for tensor_parallel_size, whole chunks per call --------------------
REFUSED = [(0, 1), (0.0, 1), (0.5, 1), (1, 2), (1.5, 1), (3, 4)]  # (ray.num_gpus_per_worker, vllm.tensor_parallel_size)


@pytest.mark.parametrize("gpus,parallel", REFUSED)
def test_a_vllm_worker_without_whole_gpus_for_its_engine_is_refused_before_ray_starts(
    gpus, parallel, tiny, cache_dir, monkeypatch
):
    spec, tokenizer = tiny
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    keys = (
        rf"ray\.engine=vllm: .* ray\.num_gpus_per_worker must be a whole number of at least "
        rf"vllm\.tensor_parallel_size={parallel}; got ray\.num_gpus_per_worker={gpus}\b"
    )
    vllm = {"tensor_parallel_size": parallel}
    with pytest.raises(ValueError, match=keys):
        ray_backend(spec, cache_dir, tokenizer, engine="vllm", vllm=vllm, num_gpus_per_worker=gpus)
    with pytest.raises(ValueError, match=keys):
        node = judge_node(spec, vllm, engine="vllm", num_gpus_per_worker=gpus)
        RayJudgePool(node, JUDGE_PROMPT, cache_dir, node.backend, BinaryPrefixSearch)
    with pytest.raises(ValueError, match=keys):
        check_gpu_request("vllm", gpus, vllm)


def test_vllm_workers_with_whole_gpus_are_accepted_and_idle_gpus_named(tiny, cache_dir, caplog):
    spec, tokenizer = tiny
    for gpus, parallel in ((1, 1), (2, 2), (1.0, 1)):
        backend = ray_backend(
            spec, cache_dir, tokenizer, engine="vllm", vllm={"tensor_parallel_size": parallel}, num_gpus_per_worker=gpus
        )
        assert backend.num_gpus_per_worker == gpus and not backend.started_ray
    check_gpu_request("vllm", 1, {})  # the engine's own tensor_parallel_size (1) without the key
    with pytest.raises(ValueError, match=r"vllm\.tensor_parallel_size=1; got ray\.num_gpus_per_worker=0"):
        check_gpu_request("vllm", 0, None)
    check_gpu_request("hf", 0, None)  # hf workers run anywhere
    check_gpu_request("hf", 0.25, None)
    with caplog.at_level(logging.WARNING, logger="palign.llm.ray_backend"):
        check_gpu_request("vllm", 4, {"tensor_parallel_size": 2})
        check_gpu_request("hf", 2, None)
    assert "vllm.tensor_parallel_size=2 GPUs: the others stay idle" in caplog.text
    assert "ray.engine=hf: each worker's model sits on one GPU" in caplog.text


def test_the_composed_config_refuses_a_vllm_worker_without_a_gpu_before_ray_starts(
    tmp_path, monkeypatch, smollm2_tokenizer
):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from palign.pipeline import RunContext, make_truncation

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    cfg = compose_config(
        [
            "experiment=tiny",
            "baseline=palign",
            "backend@truncation.judge.backend=ray",
            "backend@alignment.backend=ray",
            "ray.engine=vllm",
            "vllm.tensor_parallel_size=2",
            "ray.num_gpus_per_worker=1",
        ],
        tmp_path,
    )
    keys = (
        r"ray\.num_gpus_per_worker must be a whole number of at least vllm\.tensor_parallel_size=2; "
        r"got ray\.num_gpus_per_worker=1"
    )
    with pytest.raises(ValueError, match=keys):
        check_gpu_request(cfg.ray.engine, cfg.ray.num_gpus_per_worker, cfg.vllm)  # what the run's preflight calls
    with pytest.raises(InstantiationException, match=keys):  # the stage's node builds its back end
        instantiate(
            cfg.alignment,
            _convert_="all",
            prompts=OmegaConf.to_container(cfg.prompts, resolve=True),
            cache_dir=str(stage_cache(tmp_path)),
            tokenizer=smollm2_tokenizer,
        )
    ctx = RunContext(cfg=cfg, run_id="test", run_dir=tmp_path / "run", cache_dir=stage_cache(tmp_path))
    with pytest.raises(InstantiationException, match=keys):
        make_truncation(ctx, smollm2_tokenizer)


def test_vllm_workers_get_whole_chunks_seeded_as_in_process(tiny, cache_dir):
    """engine vllm: one payload per actor call, `ray.batch_size` prompts in their order, every request
    with `sampling.seed` (vLLM seeds per request): the same for any number of workers."""
    spec, tokenizer = tiny
    texts = [f"What is {i} + {i}?" + " Think." * (i % 4) for i in range(10)]
    sampling = SamplingConfig.from_config({**GREEDY, "batch_size": 2, "seed": 7})
    for workers in (1, 2, 5):
        backend = ray_backend(
            spec, cache_dir, tokenizer, engine="vllm", vllm={}, num_gpus_per_worker=1, num_workers=workers, batch_size=4
        )
        assert backend.groups(texts, sampling) == [([0, 1, 2, 3], 7), ([4, 5, 6, 7], 7), ([8, 9], 7)]
        assert backend.payloads_per_call(sampling) == 1
    whole = ray_backend(spec, cache_dir, tokenizer, engine="vllm", vllm={}, num_gpus_per_worker=1, batch_size=4096)
    assert whole.groups(texts, sampling) == [(list(range(10)), 7)]
    # hf keeps generate's batches: longest prompts first, sampling.batch_size each, 2 per call
    hf = ray_backend(spec, cache_dir, tokenizer, batch_size=4)
    groups = hf.groups(texts, sampling)
    lengths = [len(encode_user_turn(tokenizer, text, {})) for text in texts]
    assert [len(indices) for indices, _ in groups] == [2] * 5 and hf.payloads_per_call(sampling) == 2
    order = [i for indices, _ in groups for i in indices]
    assert sorted(order) == list(range(10)) and [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert len({seed for _, seed in groups}) == 5
