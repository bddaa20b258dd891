"""One seam for inference: what a back end is, and the one builder every stage calls.

A back end is an option of the config group `conf/backend/` (hf, vllm, ray, openai, auto): a YAML
file whose `_target_` is a `Backend` subclass, with that class's settings. Every inference stage has
a `backend` node chosen from that one group, per stage (`conf/config.yaml` picks hf for each):

    python run.py backend@alignment.backend=vllm backend@evaluation.backend=openai \
        evaluation.backend.base_url=http://gpu-node:8000/v1 evaluation.backend.server=vllm

(`alignment.backend=vllm` is taken too: run.py reads it as the first spelling.) Hydra builds the
option's object when it builds the stage, so a stage receives a `Backend` and asks it for what it
needs, never comparing names:
- `build_chat(backend, key, model, ...)`: a `ChatBackend` for the stage's model (`resolve` first:
  `auto` picks its GPU or CPU option here);
- `Backend.problems`: what the preflight refuses before anything loads (a missing server URL, vLLM
  without a GPU, Ray workers that cannot hold their engine);
- `Backend.data_parallel`: the option splits a stage's work across workers (Ray), so a stage whose
  work is more than generation (the judge's search) runs that work in the workers.

A new back end is one module (a `Backend` subclass whose `chat` returns a `ChatBackend`, and a
`VerdictScorer` for the judge's logits mode) and one YAML file in `conf/backend/`; the import-linter
contract in pyproject.toml places the module beside the other engines.

`complete_missing` is the one resumable generation loop all stages drive their back end with.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any, Protocol

from tqdm.auto import tqdm

from palign.llm.generation import Generation, SamplingConfig
from palign.llm.models import ModelSpec

log = logging.getLogger(__name__)

# In raw mode the two verdict probabilities sum to at most 1 (up to rounding).
RAW_LOGPROBS_SLACK = 1e-3


# -- what a stage is handed -------------------------------------------------------------------------
class ChatBackend(Protocol):
    """Generation: one list of `num_samples` `Generation`s per user turn, in order."""

    def complete(
        self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any]
    ) -> list[list[Generation]]: ...

    def identity(self) -> dict[str, Any]: ...


class ChatBackendError(RuntimeError):
    """A request the back end could not complete; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class VerdictScorer(Protocol):
    """The sufficiency judge's logits mode over a back end (PAPER.md §2.1): log P(enough) - log
    P(not enough) as the next token after each token-id prompt, with the tokenizer and chat template
    switches that rendered the prompts. A back end that cannot score raises from `check_logits_mode`,
    naming `truncation.judge.mode`, before any request."""

    tokenizer: Any
    chat_template_kwargs: dict[str, Any]

    def verdict_scores(
        self, prompts_token_ids: Sequence[Sequence[int]], enough_token: int, not_enough_token: int
    ) -> list[float]: ...


def verdict_score(enough: float, not_enough: float, *, reporter: str, fix: str) -> float:
    """log P(enough) - log P(not enough) from the raw logprobs of the two forced verdict requests.

    Raw logprobs of two distinct tokens sum to at most 1 in probability; a back end that reports
    processed logprobs (after `allowed_token_ids`: 0 for each) would score every prefix 0, so that
    is refused, naming who reported them (`reporter`) and the `fix`.
    """
    top = max(enough, not_enough)
    if top + math.log(math.exp(enough - top) + math.exp(not_enough - top)) > RAW_LOGPROBS_SLACK:
        raise ChatBackendError(
            f"{reporter} reported logprobs {enough:.4g} and {not_enough:.4g} for the two verdict tokens, probabilities "
            f"that sum to more than 1: it returns processed logprobs (after allowed_token_ids), not the raw ones the "
            f"judge needs; {fix}"
        )
    return enough - not_enough


# -- the options ----------------------------------------------------------------------------------
class Backend:
    """A back-end option (conf/backend/<name>.yaml). Subclasses build nothing heavy in `__init__`:
    every option of a run is built with its stage, and only the one a stage uses loads a model or
    starts an engine, in `chat`, when the stage has work."""

    data_parallel = False  # True: the option runs a stage's work in workers of its own (Ray)

    def resolve(self, key: str) -> Backend:
        """The option that runs (`auto` chooses here); `key` names the config key in messages."""
        return self

    def available(self) -> tuple[bool, str]:
        """(usable on this machine, why)."""
        return True, ""

    def problems(self, key: str, *, hardware: bool) -> list[str]:
        """What refuses this option before anything loads, each naming `key` (the preflight's
        inference check); `hardware`: also what this machine's devices refuse."""
        return []

    def chat(self, model: ModelSpec, cache_dir: Any, *, tokenizer, weights: str | None, stage: str) -> ChatBackend:
        """The stage's model (`model`, with the trained `weights` folder where given) on this back end."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Auto(Backend):
    """`backend: auto` (what the paper recipes set): its `gpu` option where that is available
    (vLLM installed and a GPU visible), else its `cpu` option, with a warning naming the key."""

    def __init__(self, gpu: Backend, cpu: Backend):
        self.gpu, self.cpu = gpu, cpu

    def resolve(self, key: str) -> Backend:
        usable, reason = self.gpu.available()
        if usable:
            return self.gpu.resolve(key)
        log.warning("%s=auto: using %r, not %r (%s)", key, self.cpu, self.gpu, reason)
        return self.cpu.resolve(key)

    def problems(self, key: str, *, hardware: bool) -> list[str]:
        return self.resolve(key).problems(key, hardware=hardware) if hardware else []

    def __repr__(self) -> str:
        return f"Auto(gpu={self.gpu!r}, cpu={self.cpu!r})"


def settings(node: Any) -> dict[str, Any]:
    """An option's settings node as a plain dict, whichever way Hydra built it (a typed node, a
    dataclass, a mapping)."""
    if node is None:
        return {}
    if is_dataclass(node) and not isinstance(node, type):
        return asdict(node)
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def build_chat(
    backend: Any, key: str, model: Any, cache_dir: Any, *, tokenizer, weights: str | None = None, stage: str
) -> ChatBackend:
    """The one builder: the stage's model on the back end chosen at `key` (e.g. `alignment.backend`)."""
    if not isinstance(backend, Backend):
        raise TypeError(
            f"{key}: expected a back-end option of conf/backend/ (hf, vllm, ray, openai, auto), "
            f"got {backend!r}; choose one with backend@{key}=NAME"
        )
    return backend.resolve(key).chat(
        ModelSpec.from_config(model), cache_dir, tokenizer=tokenizer, weights=weights, stage=stage
    )


# -- the generation loop --------------------------------------------------------------------------
def complete_missing(
    backend: ChatBackend,
    items: Sequence[tuple[str, str]],
    done: Callable[[str], bool],
    sampling: SamplingConfig | Mapping[str, Any],
    on_chunk: Callable[[list[tuple[str, list[Generation]]]], None],
    chunk_size: int = 32,
    progress: str | None = None,
) -> int:
    """The one generation loop of every stage and back end (local Hugging Face, vLLM, a server, Ray):
    complete the `(key, user_text)` items not `done`, chunk by chunk.

    `on_chunk` stores each finished chunk, so an interrupted stage (or a remote server that goes
    away) resumes with the next chunk. A back end that streams (`stream`, the Ray back end) gets
    every missing prompt in one call, so its workers start once for the stage; its replies are
    stored `chunk_size` at a time in the order they finish. Returns the number of prompts completed.
    """
    missing = [(key, text) for key, text in items if not done(key)]
    bar = tqdm(total=len(missing), desc=progress, disable=progress is None or not missing, unit="prompt")
    try:
        if missing and hasattr(backend, "stream"):
            finished: list[tuple[str, list[Generation]]] = []

            def store() -> None:
                chunk = finished[:]
                finished.clear()
                on_chunk(chunk)
                bar.update(len(chunk))

            try:
                for i, generations in backend.stream([text for _, text in missing], sampling):
                    finished.append((missing[i][0], generations))
                    if len(finished) == chunk_size:
                        store()
            finally:  # a worker failure (or an interrupt) still stores the replies that came back
                if finished:
                    store()
        else:
            for start in range(0, len(missing), chunk_size):
                chunk = missing[start : start + chunk_size]
                outputs = backend.complete([text for _, text in chunk], sampling)
                on_chunk([(key, generations) for (key, _), generations in zip(chunk, outputs)])
                bar.update(len(chunk))
    finally:
        bar.close()
    return len(missing)
