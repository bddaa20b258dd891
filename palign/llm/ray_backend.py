"""Data-parallel generation through Ray Data: `backend: ray` of the continuation and evaluation stages.

A `RayChatBackend` is a `ChatBackend`: `complete_missing` (palign/llm/openai_backend.py) still drives
it chunk by chunk into the stage's resumable record store, so a job killed mid-stage resumes with
the next chunk and never redoes or duplicates a stored record. Only the inside of one chunk is
distributed: its prompts become a Ray Dataset whose rows `map_batches` sends to `num_workers` actors,
each holding one engine built from the model config (palign's Hugging Face generation, or vLLM on
GPU workers), and the replies are put back in the input order.

Same results as the in-process `hf` path: the chunk is cut into exactly the generation batches
`generate` would make (sorted by prompt length, `sampling.batch_size` each) and each batch travels
as one row, so every worker generates the same padded batches; greedy decoding gives identical
text. Under sampling, `generate` seeds each batch from its position within one call; a Ray worker
gets one batch per call, so the batch's seed is drawn here, from `sampling.seed` and the batch's
position in the chunk: Ray's samples are reproducible and do not depend on the number of workers
or on which worker ran a batch, but they are other draws than the in-process path's (the same
sampling parameters, other random numbers).

Nothing starts before work arrives: a stage whose records are all stored never starts Ray nor
loads a model. `address: null` starts a local cluster; `auto` or `ray://host:port` joins one, whose
nodes must see the same `cache_dir` (built models live there) and the same palign install.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

from palign.llm.chat import encode_user_turn
from palign.llm.generation import Generation, SamplingConfig
from palign.llm.openai_backend import ChatBackendError

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm")


class RayWorkerError(RuntimeError):
    """Raised inside an actor: names the host and process, so the driver's message says which worker."""


class _GenerationWorker:
    """One Ray actor: an engine for the model, loaded when the actor starts; each row of a batch is
    one generation batch (`{"group", "payload"}`, the payload JSON of texts and seed)."""

    def __init__(self, spec: dict[str, Any], cache_dir: str, weights: str | None, engine: str,
                 vllm: dict[str, Any] | None, sampling: dict[str, Any], num_threads: int):
        self.where = f"ray worker pid {os.getpid()} on {socket.gethostname()}"
        try:
            from functools import partial

            import torch

            from palign.llm.models import ModelSpec, load_inference_model, load_tokenizer
            from palign.llm.openai_backend import LocalChatBackend

            if num_threads >= 1:
                torch.set_num_threads(num_threads)
            self.sampling = SamplingConfig.from_config(sampling)
            model_spec = ModelSpec.from_config(spec)
            if engine == "vllm":
                from palign.llm.vllm_backend import vllm_backend

                self.backend = vllm_backend(model_spec, cache_dir, vllm or {}, weights=weights)
            else:
                # the model itself loads with the actor's first batch (a failure there names the worker too)
                self.backend = LocalChatBackend(partial(load_inference_model, model_spec, cache_dir, path=weights),
                                                load_tokenizer(model_spec, cache_dir), model_spec.chat_template_kwargs)
        except Exception as err:  # noqa: BLE001 (reported to the driver with where it happened)
            raise RayWorkerError(f"{self.where}: could not build the '{engine}' engine for model "
                                 f"'{spec.get('name')}': {type(err).__name__}: {err}") from err

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = []
        for payload in batch["payload"]:
            request = json.loads(payload)
            try:
                outputs = self.backend.complete(request["texts"], replace(self.sampling, seed=request["seed"]))
            except Exception as err:  # noqa: BLE001
                raise RayWorkerError(f"{self.where}: generation failed: {type(err).__name__}: {err}") from err
            results.append(json.dumps([[asdict(g) for g in generations] for generations in outputs]))
        return {"group": np.asarray(batch["group"]), "result": np.asarray(results, dtype=object)}


class RayChatBackend:
    """`complete(user_texts, sampling)` sharded across Ray Data actors (see the module docstring).

    spec: the model config (palign/llm/models.py: ModelSpec); weights: a folder replacing its weights
    (a trained student). tokenizer: the model's, to cut the chunk into the generation batches the
    in-process path makes. stage: names the stage in errors. The other arguments are the `ray:`
    block's (palign/schema.py: Ray); `vllm` the engine settings when `engine` is vllm.
    """

    def __init__(self, spec: Mapping[str, Any], cache_dir: str | os.PathLike, tokenizer, *, num_workers: int,
                 num_cpus_per_worker: float, num_gpus_per_worker: float, engine: str, address: str | None,
                 batch_size: int, weights: str | None = None, vllm: Mapping[str, Any] | None = None, stage: str = "ray"):
        if engine not in ENGINES:
            raise ValueError(f"ray.engine must be one of {ENGINES}, got '{engine}'")
        if num_workers < 1 or batch_size < 1 or num_cpus_per_worker <= 0 or num_gpus_per_worker < 0:
            raise ValueError(f"ray: num_workers and batch_size must be >= 1, num_cpus_per_worker > 0 and "
                             f"num_gpus_per_worker >= 0; got {num_workers}, {batch_size}, {num_cpus_per_worker}, "
                             f"{num_gpus_per_worker}")
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
        self.calls = 0  # worker rounds run (one per chunk with work)

    def identity(self) -> dict[str, Any]:
        return {"backend": "ray", "engine": self.engine, "model": self.spec.get("name"), "weights": self.weights}

    def __repr__(self) -> str:
        return (f"RayChatBackend({self.spec.get('name')!r}, engine={self.engine!r}, num_workers={self.num_workers}, "
                f"address={self.address!r})")

    def _connect(self) -> None:
        import ray

        if not ray.is_initialized():
            # log_to_driver: a worker's traceback reaches the driver's console as well as the exception
            ray.init(address=self.address, include_dashboard=False, log_to_driver=True)
            self.started_ray = True
        resources = ray.cluster_resources()
        for name, need in (("CPU", self.num_cpus_per_worker), ("GPU", self.num_gpus_per_worker)):
            if need > 0 and resources.get(name, 0) < need:
                raise ChatBackendError(
                    f"{self.stage}: each Ray worker asks for {need} {name} but the cluster at "
                    f"{self.address or 'local'} has {resources.get(name, 0)}; lower ray.num_{name.lower()}s_per_worker "
                    "or join a cluster that has them (ray.address)")
        if resources.get("CPU", 0) < self.num_workers * self.num_cpus_per_worker:
            log.warning("%s: %d Ray workers x %s CPUs exceed the cluster's %s CPUs; workers wait for each other",
                        self.stage, self.num_workers, self.num_cpus_per_worker, resources.get("CPU", 0))

    def groups(self, user_texts: Sequence[str], sampling: SamplingConfig) -> list[tuple[list[int], int]]:
        """(prompt indices, seed) of each generation batch: `generate`'s batches (longest prompts
        first, `sampling.batch_size` each), each seeded from `sampling.seed` and its position."""
        import torch

        lengths = [len(encode_user_turn(self.tokenizer, text, self.chat_template_kwargs)) for text in user_texts]
        order = sorted(range(len(user_texts)), key=lambda i: -lengths[i])
        seeds = torch.Generator().manual_seed(sampling.seed)
        return [(order[start : start + sampling.batch_size], int(torch.randint(0, 2**31 - 1, (1,), generator=seeds)))
                for start in range(0, len(order), sampling.batch_size)]

    def complete(self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any],
                 progress: str | None = None) -> list[list[Generation]]:
        sampling = SamplingConfig.from_config(sampling)
        if not user_texts:
            return []
        import ray.data

        # a missing folder fails here, before any actor starts
        if self.weights and not os.path.isdir(self.weights):
            raise FileNotFoundError(f"{self.stage}: no model folder at {self.weights} (the weights to evaluate)")
        if self.spec.get("source") == "local" and not self.weights:
            from palign.llm.models import resolve_model_path

            resolve_model_path(self.spec, self.cache_dir)
        self._connect()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress is not None
        groups = self.groups(user_texts, sampling)
        rows = [{"group": k, "payload": json.dumps({"texts": [user_texts[i] for i in indices], "seed": seed})}
                for k, (indices, seed) in enumerate(groups)]
        dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), self.num_workers * 4))
        dataset = dataset.map_batches(
            _GenerationWorker,
            fn_constructor_kwargs=dict(spec=self.spec, cache_dir=self.cache_dir, weights=self.weights, engine=self.engine,
                                       vllm=self.vllm, sampling=asdict(sampling),
                                       num_threads=int(self.num_cpus_per_worker) if self.num_gpus_per_worker == 0 else 0),
            compute=ray.data.ActorPoolStrategy(size=min(self.num_workers, len(rows))),
            batch_size=max(1, self.batch_size // sampling.batch_size),
            num_cpus=self.num_cpus_per_worker,
            num_gpus=self.num_gpus_per_worker or None,
            batch_format="numpy",
        )
        try:
            replies = dataset.take_all()
        except Exception as err:  # noqa: BLE001 (Ray wraps the worker's error; keep its first line readable)
            raise ChatBackendError(f"{self.stage}: a Ray worker failed ({self.engine} engine, model "
                                   f"'{self.spec.get('name')}'): {_worker_message(err)}") from err
        self.calls += 1
        results: list[list[Generation] | None] = [None] * len(user_texts)
        for reply in replies:
            indices, _ = groups[int(reply["group"])]
            for i, generations in zip(indices, json.loads(reply["result"]), strict=True):
                results[i] = [Generation(**g) for g in generations]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise ChatBackendError(f"{self.stage}: Ray returned no reply for {len(missing)} of {len(user_texts)} prompts")
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


def ray_backend(spec: Any, cache_dir: Any, ray_cfg: Any, vllm_cfg: Any, tokenizer, *, weights: str | None = None,
                stage: str = "ray") -> RayChatBackend:
    """The back end for a stage's model config and the run's `ray:` block (nothing starts here)."""
    from omegaconf import DictConfig, OmegaConf

    from palign.llm.models import ModelSpec

    def plain(node: Any) -> dict[str, Any]:
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})

    settings = plain(ray_cfg)
    known = {"num_workers", "num_cpus_per_worker", "num_gpus_per_worker", "engine", "address", "batch_size"}
    if set(settings) != known:
        raise ValueError(f"ray config: expected the keys {sorted(known)}, got {sorted(settings)} (palign/schema.py: Ray)")
    model = ModelSpec.from_config(spec)
    return RayChatBackend(asdict(model), cache_dir, tokenizer, weights=weights, vllm=plain(vllm_cfg), stage=stage, **settings)
