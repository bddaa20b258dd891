"""Data-parallel generation through Ray Data: `backend: ray` of any stage (conf/backend/ray.yaml, the
option `RayBackend`, whose workers are the run's `ray:` block).

A `RayChatBackend` is a `ChatBackend` that streams: `complete_missing` (palign/llm/backends.py)
hands it every prompt its stage still misses in one call, and stores the replies into the stage's
resumable record store `chunk_size` at a time as they come back, so a driver killed mid-stage
resumes with what was not stored and never redoes or duplicates a stored record. The prompts
become one Ray Dataset whose rows `map_batches` sends to one pool of `num_workers` actors for the
whole stage, each holding one engine built from the model config (palign's Hugging Face
generation, or vLLM on GPU workers) and loading its model once. `stream_through_actors` is that
pool for any work (the judge's search uses it too: palign/truncation/).

What travels in one actor call depends on the engine:
- hf: the same results as the in-process `hf` path. The prompts are cut into exactly the generation
  batches `generate` would make (sorted by prompt length, `sampling.batch_size` each), each batch is
  one payload and an actor call carries `ray.batch_size // sampling.batch_size` of them; every
  worker generates the same padded batches, so greedy decoding gives identical text. Under
  sampling, `generate` seeds each batch from its position within one call; a Ray worker gets one
  batch per payload, so the batch's seed is drawn here, from `sampling.seed` and the batch's
  position among the stage's prompts: Ray's samples are reproducible and do not depend on the
  number of workers or on which worker ran a batch, but they are other draws than the in-process
  path's (the same sampling parameters, other random numbers).
- vllm: an actor call is one payload of `ray.batch_size` prompts (in the stage's order), handed to
  vLLM as one `generate()` request batch, which its continuous batching schedules; cutting it into
  `sampling.batch_size` batches would starve the engine. Every request carries `sampling.seed`
  (vLLM seeds per request: palign/llm/vllm_backend.py, `sampling_kwargs`), as in process, so a
  prompt's samples depend on its text and the seed, not on the number of workers, on the chunk it
  travelled in, or on which worker ran it.

GPUs: each actor sees exactly the GPUs Ray assigned it. Ray sets `CUDA_VISIBLE_DEVICES` in an actor
to its assigned GPUs, but Ray 2.60 (Ray issue 54868) leaves the variable as the node had it when it
assigned none (ray/_private/utils.py: `set_visible_accelerator_ids` skips an empty id list unless
`RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO` is set; ray/_private/accelerators/accelerator.py): a CPU-only
actor would see every GPU of its node, resolve device `auto` to GPU 0 and pile onto it. The
actors' runtime_env sets that switch (`ACTOR_ENV`), so Ray itself empties the variable of an actor
with no GPU, when the actor's task starts and before its constructor runs (torch never
initialised CUDA before that). An actor with `num_gpus_per_worker: N` sees its N GPUs only: the hf
engine's device `auto` is `cuda`, i.e. cuda:0 of the actor's own GPUs (the model sits on one GPU;
more per worker stay idle), and a vLLM engine uses them for `vllm.tensor_parallel_size`, which
`check_gpu_request` holds to whole GPUs of the actor's own before anything starts.

Nothing starts before work arrives: a stage whose records are all stored never starts Ray nor
loads a model. `address: null` starts a local cluster; `auto` or `ray://host:port` joins one, whose
nodes must see the same `cache_dir` (built models live there) and the same palign install.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

from palign.llm import backends
from palign.llm.backends import Backend, ChatBackendError
from palign.llm.chat import encode_user_turn
from palign.llm.generation import Generation, SamplingConfig
from palign.llm.hf_backend import HFBackend
from palign.llm.models import ModelSpec, load_tokenizer
from palign.llm.vllm_backend import VLLMBackend

log = logging.getLogger(__name__)

# what each actor holds, by `ray.engine`: the in-process back-end options, built in the actor
ENGINES = ("hf", "vllm")


def engine_option(engine: str, vllm: Mapping[str, Any] | None) -> Backend:
    """The back-end option each actor builds its engine with (`ray.engine`, with the `vllm:` settings)."""
    if engine not in ENGINES:
        raise ValueError(f"ray.engine must be one of {ENGINES}, got '{engine}'")
    return VLLMBackend(vllm or {}) if engine == ENGINES[1] else HFBackend()


# The runtime_env variables of every actor: Ray empties the accelerator variables
# (CUDA_VISIBLE_DEVICES, ...) of an actor it assigned none (see the module docstring).
ACTOR_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}


class RayWorkerError(RuntimeError):
    """Raised inside an actor: names the host and process, so the driver's message says which worker."""


class ActorWorker:
    """A Ray actor of `stream_through_actors`: `build(**kwargs)` once when the actor starts (its model
    loads once), then `handle(request)` for each payload (a JSON object) of each batch, returning a
    JSON-able result. A failure in either names the worker's host and process (RayWorkerError).

    num_threads: torch threads of a CPU actor (`worker_threads`); 0 leaves torch's default.
    """

    task = "work"  # names what failed in `handle`

    def __init__(self, num_threads: int, **kwargs: Any):
        self.where = f"ray worker pid {os.getpid()} on {socket.gethostname()}"
        try:
            import torch

            if num_threads >= 1:
                torch.set_num_threads(num_threads)
            self.build(**kwargs)
        except Exception as err:  # reported to the driver with where it happened
            raise RayWorkerError(
                f"{self.where}: could not build {self.describe(**kwargs)}: {type(err).__name__}: {err}"
            ) from err

    def build(self, **kwargs: Any) -> None:
        raise NotImplementedError

    def describe(self, **kwargs: Any) -> str:
        """What `build` makes, for its error message."""
        return type(self).__name__

    def handle(self, request: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = []
        for payload in batch["payload"]:
            try:
                result = self.handle(json.loads(payload))
            except Exception as err:
                raise RayWorkerError(f"{self.where}: {self.task} failed: {type(err).__name__}: {err}") from err
            results.append(json.dumps(result))
        return {"position": np.asarray(batch["position"]), "result": np.asarray(results, dtype=object)}


class _GenerationWorker(ActorWorker):
    """An engine for the model; each payload is texts and a seed: one generation batch (hf) or a
    whole chunk, one vLLM `generate()` request batch (vllm). On a GPU actor the hf engine's device
    `auto` is cuda:0 of the actor's own GPUs (CUDA_VISIBLE_DEVICES names only those)."""

    task = "generation"

    def build(
        self,
        spec: dict[str, Any],
        cache_dir: str,
        weights: str | None,
        engine: str,
        vllm: dict[str, Any] | None,
        sampling: dict[str, Any],
    ) -> None:
        self.sampling = SamplingConfig.from_config(sampling)
        model = ModelSpec.from_config(spec)
        # an hf model itself loads with the actor's first batch (a failure there names the worker too)
        self.backend = engine_option(engine, vllm).chat(
            model, cache_dir, tokenizer=load_tokenizer(model, cache_dir), weights=weights, stage=self.task
        )

    def describe(self, spec: dict[str, Any], engine: str, **_: Any) -> str:
        return f"the '{engine}' engine for model '{spec.get('name')}'"

    def handle(self, request: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
        outputs = self.backend.complete(request["texts"], replace(self.sampling, seed=request["seed"]))
        return [[asdict(g) for g in generations] for generations in outputs]


def check_gpu_request(engine: str, num_gpus_per_worker: float, vllm: Mapping[str, Any] | None) -> None:
    """Refuse a `ray:` block whose workers cannot hold their engine, before anything starts.

    A vLLM engine runs on whole GPUs of its own, `vllm.tensor_parallel_size` of them: with
    `ray.engine: vllm`, `ray.num_gpus_per_worker` must be a whole number of at least that (0 would
    give an actor no GPU: vLLM is GPU only; a share of a GPU would put two engines, each reserving
    `vllm.gpu_memory_utilization` of it, on one GPU). More GPUs than the engine uses, and more than
    one for the hf engine (its model sits on one GPU), only leave GPUs idle: a warning. The pipeline
    calls this on the composed config (`ray`, `vllm` blocks); RayChatBackend and RayJudgePool on
    construction.
    """
    from palign.llm.vllm_backend import VLLMChatBackend

    gpus = num_gpus_per_worker
    if engine == "vllm":
        parallel = (vllm or {}).get("tensor_parallel_size")
        if parallel is None:  # what the engine gets without the key
            parallel = inspect.signature(VLLMChatBackend).parameters["tensor_parallel_size"].default
        if not float(gpus).is_integer() or gpus < parallel:
            raise ValueError(
                f"ray.engine=vllm: each Ray worker holds one vLLM engine on whole GPUs of its own, so "
                f"ray.num_gpus_per_worker must be a whole number of at least vllm.tensor_parallel_size={parallel}; "
                f"got ray.num_gpus_per_worker={gpus}. Set ray.num_gpus_per_worker={parallel} (on a machine "
                "without GPUs: ray.engine=hf)"
            )
        if gpus > parallel:
            log.warning(
                "ray.num_gpus_per_worker=%s but each worker's vLLM engine uses vllm.tensor_parallel_size=%d "
                "GPUs: the others stay idle",
                gpus,
                parallel,
            )
    elif gpus > 1:
        log.warning(
            "ray.num_gpus_per_worker=%s with ray.engine=%s: each worker's model sits on one GPU (device auto: "
            "the first of its own), the others stay idle",
            gpus,
            engine,
        )


def check_nodes_hold_a_worker(
    nodes: Sequence[Mapping[str, float]], num_cpus_per_worker: float, num_gpus_per_worker: float, where: str, stage: str
) -> None:
    """Refuse a cluster none of whose nodes (`nodes`: each alive node's resources, as `ray.nodes()`
    reports them) has the CPUs and GPUs one worker asks for: an actor lives on one node, so Ray
    would leave it pending forever (a cluster whose GPUs are all on other nodes included)."""
    for name, need in (("CPU", num_cpus_per_worker), ("GPU", num_gpus_per_worker)):
        largest = max((node.get(name, 0) for node in nodes), default=0)
        if need > 0 and largest < need:
            total = sum(node.get(name, 0) for node in nodes)
            raise ChatBackendError(
                f"{stage}: each Ray worker asks for {need} {name} but no node of the cluster at {where} has them "
                f"(the largest has {largest}, {total} in all over {len(nodes)} node{'s' * (len(nodes) != 1)}); "
                f"lower ray.num_{name.lower()}s_per_worker or join a cluster that has them (ray.address)"
            )
    fits = [
        node
        for node in nodes
        if node.get("CPU", 0) >= num_cpus_per_worker and node.get("GPU", 0) >= num_gpus_per_worker
    ]
    if not fits:
        raise ChatBackendError(
            f"{stage}: each Ray worker asks for {num_cpus_per_worker} CPU and {num_gpus_per_worker} GPU on one node, "
            f"but no node of the cluster at {where} has both; lower ray.num_cpus_per_worker or "
            "ray.num_gpus_per_worker, or join a cluster that has them (ray.address)"
        )


def connect(
    address: str | None, num_workers: int, num_cpus_per_worker: float, num_gpus_per_worker: float, stage: str
) -> bool:
    """Join (or, with `address` null, start) the cluster and check one of its nodes can hold a worker
    (`check_nodes_hold_a_worker`); True when this call started it. A cluster short of CPUs for all
    workers at once is only a warning."""
    import ray

    started = False
    if not ray.is_initialized():
        # log_to_driver: a worker's traceback reaches the driver's console as well as the exception
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
        started = True
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    check_nodes_hold_a_worker(nodes, num_cpus_per_worker, num_gpus_per_worker, address or "local", stage)
    resources = ray.cluster_resources()
    if resources.get("CPU", 0) < num_workers * num_cpus_per_worker:
        log.warning(
            "%s: %d Ray workers x %s CPUs exceed the cluster's %s CPUs; workers wait for each other",
            stage,
            num_workers,
            num_cpus_per_worker,
            resources.get("CPU", 0),
        )
    return started


def stream_through_actors(
    payloads: Sequence[str],
    worker: type,
    worker_kwargs: Mapping[str, Any],
    *,
    num_workers: int,
    num_cpus_per_worker: float,
    num_gpus_per_worker: float,
    payloads_per_call: int,
    stage: str,
    describe: str,
    progress: bool = False,
) -> Iterator[tuple[int, Any]]:
    """`(position, result)` for each of `payloads` (JSON texts), in the order they finish.

    One pool of `min(num_workers, len(payloads))` actors of `worker` (an `ActorWorker`, built once with
    `worker_kwargs`, so a model loads once per actor for the whole call) maps the payloads,
    `payloads_per_call` per actor call; `worker(batch)` gets `{"position", "payload"}` columns and
    returns `{"position", "result"}` (result: JSON). Each actor reserves `num_cpus_per_worker` CPUs and
    `num_gpus_per_worker` GPUs and sees those GPUs only, none when it asks for none (`ACTOR_ENV`).
    Results stream back as soon as a block finishes, so the caller can store each one while the
    others are computed: a driver killed mid-stage loses only what it had not stored. `describe`
    names the work in errors; a worker's RayWorkerError reaches the message.
    """
    if not payloads:
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.execution_options.preserve_order = False  # hand back whatever finishes first
    rows = [{"position": k, "payload": payload} for k, payload in enumerate(payloads)]
    calls = -(-len(rows) // payloads_per_call)
    dataset = ray.data.from_items(rows, override_num_blocks=calls)  # one block per actor call
    dataset = dataset.map_batches(
        worker,
        fn_constructor_kwargs=dict(worker_kwargs),
        compute=ray.data.ActorPoolStrategy(size=min(num_workers, calls)),
        batch_size=payloads_per_call,
        num_cpus=num_cpus_per_worker,
        num_gpus=num_gpus_per_worker or None,
        runtime_env={"env_vars": ACTOR_ENV},  # an actor sees exactly the GPUs Ray assigned it
        batch_format="numpy",
    )
    try:
        for row in dataset.iter_rows():
            yield int(row["position"]), json.loads(row["result"])
    except Exception as err:  # Ray wraps the worker's error; keep its first line readable
        raise ChatBackendError(f"{stage}: a Ray worker failed ({describe}): {_worker_message(err)}") from err


class RayChatBackend:
    """`complete(user_texts, sampling)` sharded across Ray Data actors (see the module docstring).

    spec: the model config (palign/llm/models.py: ModelSpec); weights: a folder replacing its weights
    (a trained student). tokenizer: the model's, to cut the prompts into the generation batches the
    in-process path makes. stage: names the stage in errors. The other arguments are the `ray:`
    block's (palign/schema.py: Ray); `vllm` the engine settings when `engine` is vllm. A request
    whose workers cannot hold their engine (`check_gpu_request`) is refused here, before Ray starts.
    """

    def __init__(
        self,
        spec: Mapping[str, Any],
        cache_dir: str | os.PathLike,
        tokenizer,
        *,
        num_workers: int,
        num_cpus_per_worker: float,
        num_gpus_per_worker: float,
        engine: str,
        address: str | None,
        batch_size: int,
        weights: str | None = None,
        vllm: Mapping[str, Any] | None = None,
        stage: str = "ray",
    ):
        if engine not in ENGINES:
            raise ValueError(f"ray.engine must be one of {ENGINES}, got '{engine}'")
        if num_workers < 1 or batch_size < 1 or num_cpus_per_worker <= 0 or num_gpus_per_worker < 0:
            raise ValueError(
                f"ray: num_workers and batch_size must be >= 1, num_cpus_per_worker > 0 and "
                f"num_gpus_per_worker >= 0; got {num_workers}, {batch_size}, {num_cpus_per_worker}, "
                f"{num_gpus_per_worker}"
            )
        check_gpu_request(engine, num_gpus_per_worker, vllm)
        self.spec = dict(spec)
        self.cache_dir = str(cache_dir)
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(self.spec.get("chat_template_kwargs") or {})
        self.num_workers = num_workers
        self.num_cpus_per_worker = num_cpus_per_worker
        self.num_gpus_per_worker = num_gpus_per_worker
        self.engine = engine
        self.address = address
        self.batch_size = batch_size
        self.weights = weights
        self.vllm = dict(vllm or {})
        self.stage = stage
        self.started_ray = False  # whether this back end started the (local) cluster
        self.calls = 0  # actor pools started (one per `stream`/`complete` call with work)

    def identity(self) -> dict[str, Any]:
        return {"backend": "ray", "engine": self.engine, "model": self.spec.get("name"), "weights": self.weights}

    def __repr__(self) -> str:
        return (
            f"RayChatBackend({self.spec.get('name')!r}, engine={self.engine!r}, num_workers={self.num_workers}, "
            f"address={self.address!r})"
        )

    def _connect(self) -> None:
        self.started_ray |= connect(
            self.address, self.num_workers, self.num_cpus_per_worker, self.num_gpus_per_worker, self.stage
        )

    def groups(self, user_texts: Sequence[str], sampling: SamplingConfig) -> list[tuple[list[int], int]]:
        """(prompt indices, seed) of each payload (see the module docstring).

        hf: `generate`'s batches (longest prompts first, `sampling.batch_size` each), each seeded from
        `sampling.seed` and its position. vllm: whole chunks of `ray.batch_size` prompts in their
        order, every request seeded with `sampling.seed` as in process."""
        if self.engine == "vllm":
            return [
                (list(range(start, min(start + self.batch_size, len(user_texts)))), sampling.seed)
                for start in range(0, len(user_texts), self.batch_size)
            ]
        import torch

        lengths = [len(encode_user_turn(self.tokenizer, text, self.chat_template_kwargs)) for text in user_texts]
        order = sorted(range(len(user_texts)), key=lambda i: -lengths[i])
        seeds = torch.Generator().manual_seed(sampling.seed)
        return [
            (order[start : start + sampling.batch_size], int(torch.randint(0, 2**31 - 1, (1,), generator=seeds)))
            for start in range(0, len(order), sampling.batch_size)
        ]

    def payloads_per_call(self, sampling: SamplingConfig) -> int:
        """Payloads (`groups`) per actor call: `ray.batch_size` prompts' worth of generation batches
        (hf), one whole chunk (vllm)."""
        return 1 if self.engine == "vllm" else max(1, self.batch_size // sampling.batch_size)

    def stream(
        self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any], progress: str | None = None
    ) -> Iterator[tuple[int, list[Generation]]]:
        """`(index into user_texts, generations)` as each generation batch finishes, from one pool of
        actors for all of `user_texts` (each loads its model once)."""
        sampling = SamplingConfig.from_config(sampling)
        if not user_texts:
            return
        # a missing folder fails here, before any actor starts
        if self.weights and not os.path.isdir(self.weights):
            raise FileNotFoundError(f"{self.stage}: no model folder at {self.weights} (the weights to evaluate)")
        if self.spec.get("source") == "local" and not self.weights:
            from palign.llm.models import resolve_model_path

            resolve_model_path(self.spec, self.cache_dir)
        self._connect()
        groups = self.groups(user_texts, sampling)
        payloads = [json.dumps({"texts": [user_texts[i] for i in indices], "seed": seed}) for indices, seed in groups]
        worker_kwargs = dict(
            spec=self.spec,
            cache_dir=self.cache_dir,
            weights=self.weights,
            engine=self.engine,
            vllm=self.vllm,
            sampling=asdict(sampling),
            num_threads=worker_threads(self.num_cpus_per_worker, self.num_gpus_per_worker),
        )
        self.calls += 1
        for position, outputs in stream_through_actors(
            payloads,
            _GenerationWorker,
            worker_kwargs,
            num_workers=self.num_workers,
            num_cpus_per_worker=self.num_cpus_per_worker,
            num_gpus_per_worker=self.num_gpus_per_worker,
            payloads_per_call=self.payloads_per_call(sampling),
            stage=self.stage,
            describe=f"{self.engine} engine, model '{self.spec.get('name')}'",
            progress=progress is not None,
        ):
            indices, _ = groups[position]
            for i, generations in zip(indices, outputs, strict=True):
                yield i, [Generation(**g) for g in generations]

    def complete(
        self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any], progress: str | None = None
    ) -> list[list[Generation]]:
        results: list[list[Generation] | None] = [None] * len(user_texts)
        for i, generations in self.stream(user_texts, sampling, progress):
            results[i] = generations
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise ChatBackendError(
                f"{self.stage}: Ray returned no reply for {len(missing)} of {len(user_texts)} prompts"
            )
        return results  # type: ignore[return-value]


def _worker_message(err: BaseException) -> str:
    """The worker's own message (RayWorkerError) when Ray's wrapping holds one, else Ray's first line."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, RayWorkerError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    for line in text.splitlines():
        if "ray worker pid" in line:
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def ray_settings(ray_cfg: Any) -> dict[str, Any]:
    """The `ray:` block (palign/schema.py: Ray) as plain keyword arguments, its keys checked."""
    from omegaconf import DictConfig, OmegaConf

    settings = OmegaConf.to_container(ray_cfg, resolve=True) if isinstance(ray_cfg, DictConfig) else dict(ray_cfg or {})
    known = {"num_workers", "num_cpus_per_worker", "num_gpus_per_worker", "engine", "address", "batch_size"}
    if set(settings) != known:
        raise ValueError(
            f"ray config: expected the keys {sorted(known)}, got {sorted(settings)} (palign/schema.py: Ray)"
        )
    if settings["engine"] not in ENGINES:
        raise ValueError(f"ray.engine must be one of {ENGINES}, got '{settings['engine']}'")
    return settings


def worker_threads(num_cpus_per_worker: float, num_gpus_per_worker: float) -> int:
    """torch threads of a CPU actor (its reserved CPUs); 0 (torch's default) on a GPU actor."""
    return int(num_cpus_per_worker) if num_gpus_per_worker == 0 else 0


class RayBackend(Backend):
    """`backend: ray` (conf/backend/ray.yaml): the stage's work over Ray Data actors, `workers` being the
    run's `ray:` block and `vllm` its engine settings for `ray.engine: vllm`. Generation stages get a
    `RayChatBackend`; the judge, whose work is a search (`data_parallel`), runs whole chunks in actors
    of its own (palign/truncation/ray_judge.py). Nothing starts until a stage has work."""

    data_parallel = True

    def __init__(self, workers: Any, vllm: Any):
        self.workers = ray_settings(backends.settings(workers))
        self.vllm = backends.settings(vllm)

    def engine(self) -> Backend:
        """The option each actor builds its engine with."""
        return engine_option(self.workers["engine"], self.vllm)

    def problems(self, key: str, *, hardware: bool) -> list[str]:
        try:
            check_gpu_request(self.workers["engine"], self.workers["num_gpus_per_worker"], self.vllm)
        except ValueError as err:
            return [f"{key}=ray: {err}"]
        return []

    def chat(self, model: ModelSpec, cache_dir: Any, *, tokenizer, weights: str | None, stage: str) -> RayChatBackend:
        return RayChatBackend(
            asdict(model), cache_dir, tokenizer, weights=weights, vllm=self.vllm, stage=stage, **self.workers
        )

    def __repr__(self) -> str:
        return f"RayBackend(engine={self.workers['engine']!r}, num_workers={self.workers['num_workers']})"
