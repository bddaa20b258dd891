"""The sufficiency judge data-parallel over Ray Data actors (`backend@truncation.judge.backend=ray`).

The judge's work is not text generation but scores and searches, so it goes through palign's own
engine in Ray Data actors (palign/llm/ray_backend.py: `stream_through_actors`), not `ray.data.llm`.
Each actor builds one judge from the `truncation.judge` node (`build_judge` on the Ray option's
engine option: the Hugging Face judge, or vLLM's with `ray.engine: vllm`) and loads its model once
for the whole stage. The stage sends its missing traces as whole chunks
(`truncation.search.chunk_size` traces each, the chunks the in-process path cuts); an actor runs the
same search over a chunk (`search_prefixes`, the same judge batches), so verdicts, scores and chosen
prefixes equal the in-process path's. The driver builds and stores each chunk's rows as it comes
back, in any order: a driver killed mid-stage resumes with the chunks it had not stored. The driver
loads no judge; a quantile threshold is calibrated by one actor before the search (once per store,
like in process).

Each actor sees only the GPUs Ray assigned it (palign/llm/ray_backend.py, module docstring): the
Hugging Face judge's device `auto` is then the actor's own GPU (none: the CPU), and a vLLM judge
gets whole GPUs of its own, `vllm.tensor_parallel_size` of them, which `check_gpu_request` holds
the `ray:` block to when the pool is built, before Ray starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from palign.llm.backends import Backend
from palign.llm.ray_backend import (
    ActorWorker,
    RayBackend,
    check_gpu_request,
    connect,
    stream_through_actors,
    worker_threads,
)
from palign.schema import Judge, JudgePrompt
from palign.truncation.prefixes import SearchFactory, build_judge, search_prefixes
from palign.truncation.units import Segmentation

STAGE = "truncation (sufficiency judge)"


def _encode(questions: Sequence[str], segs: Sequence[Segmentation]) -> list[dict[str, Any]]:
    return [
        {"question": q, "text": s.text, "units": list(s.units), "joiner": s.joiner, "granularity": s.granularity}
        for q, s in zip(questions, segs, strict=True)
    ]


def _decode(traces: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[Segmentation]]:
    return (
        [t["question"] for t in traces],
        [Segmentation(t["text"], tuple(t["units"]), t["joiner"], t["granularity"]) for t in traces],
    )


class _JudgeWorker(ActorWorker):
    """A judge; each payload is a chunk of traces to search (`search`) or whose prefixes `ks` to
    score (`scores`, the quantile calibration)."""

    task = "judging"

    def build(
        self, judge: Judge, judge_prompt: JudgePrompt, cache_dir: str, engine: Backend, search: SearchFactory
    ) -> None:
        self.threshold = judge.threshold
        self.search = search
        self.judge = build_judge(judge, judge_prompt, cache_dir, engine)

    def describe(self, judge: Judge, engine: Backend, **_: Any) -> str:
        return f"the judge on {engine!r} for model '{judge.model.name}'"

    def handle(self, request: Mapping[str, Any]) -> Any:
        questions, segs = _decode(request["traces"])
        if request["kind"] == "scores":
            found = self.judge.prefix_scores(list(zip(questions, segs, request["ks"], strict=True)))
            return [sorted(values.items()) for values in found]  # JSON has no integer keys
        return search_prefixes(
            self.search, self.threshold, self.judge, questions, segs, quantile_threshold=request["threshold"]
        )


class RayJudgePool:
    """The stage's judging in Ray actors: `search` for chunks of traces, `prefix_scores` for the
    calibration. Nothing starts before work arrives (a cache hit never starts Ray); a `ray:` block
    whose workers cannot hold the judge's engine (`check_gpu_request`) is refused here."""

    def __init__(
        self, judge: Judge, judge_prompt: JudgePrompt, cache_dir: str | Path, backend: RayBackend, search: SearchFactory
    ):
        """The pool of the `truncation.judge` node on its Ray option `backend` (workers: the run's `ray:`
        block), searching with `search`."""
        self.ray = backend.workers
        self.engine = backend.engine()
        check_gpu_request(self.ray["engine"], self.ray["num_gpus_per_worker"], backend.vllm)
        self.judge = judge
        self.judge_prompt = judge_prompt
        self.cache_dir = str(cache_dir)
        self.search_factory = search  # `search` is the method that sends chunks
        self.started_ray = False
        self.calls = 0  # actor pools started

    def __repr__(self) -> str:
        return (
            f"RayJudgePool({self.judge.model.name!r}, engine={self.ray['engine']!r}, "
            f"num_workers={self.ray['num_workers']}, address={self.ray['address']!r})"
        )

    def _stream(self, payloads: Sequence[dict[str, Any]], num_workers: int) -> Iterator[tuple[int, Any]]:
        spec = self.judge.model
        if spec.source == "local":  # a missing model folder fails here, before any actor starts
            from palign.llm.models import resolve_model_path

            resolve_model_path(spec, self.cache_dir)
        ray = self.ray
        self.started_ray |= connect(
            ray["address"], num_workers, ray["num_cpus_per_worker"], ray["num_gpus_per_worker"], STAGE
        )
        self.calls += 1
        worker_kwargs = dict(
            judge=self.judge,
            judge_prompt=self.judge_prompt,
            cache_dir=self.cache_dir,
            engine=self.engine,
            search=self.search_factory,
            num_threads=worker_threads(ray["num_cpus_per_worker"], ray["num_gpus_per_worker"]),
        )
        yield from stream_through_actors(
            [json.dumps(payload) for payload in payloads],
            _JudgeWorker,
            worker_kwargs,
            num_workers=num_workers,
            num_cpus_per_worker=ray["num_cpus_per_worker"],
            num_gpus_per_worker=ray["num_gpus_per_worker"],
            payloads_per_call=1,
            stage=STAGE,
            describe=f"{ray['engine']} judge, model '{spec.name}'",
        )

    def search(
        self, chunks: Sequence[tuple[Sequence[str], Sequence[Segmentation]]], quantile_threshold: float | None
    ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """`(chunk position, search outcomes)` for each (questions, segmentations) chunk as an actor
        finishes it; one pool of `ray.num_workers` actors for all the chunks."""
        payloads = [
            {"kind": "search", "traces": _encode(questions, segs), "threshold": quantile_threshold}
            for questions, segs in chunks
        ]
        yield from self._stream(payloads, self.ray["num_workers"])

    def prefix_scores(self, items: Sequence[tuple[str, Segmentation, Sequence[int]]]) -> list[dict[int, float]]:
        """The scores of the prefixes `ks` of each (question, segmentation), from one actor (the
        quantile's calibration)."""
        payload = {
            "kind": "scores",
            "traces": _encode([q for q, _, _ in items], [s for _, s, _ in items]),
            "ks": [list(ks) for _, _, ks in items],
        }
        ((_, found),) = list(self._stream([payload], 1))
        return [{int(k): score for k, score in pairs} for pairs in found]
