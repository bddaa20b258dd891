"""The vLLM back end (GPU only, `pip install 'palign[vllm]'`): the same prompts and scores as the
Hugging Face path, served by vLLM's continuous batching and prefix cache.

It runs the inference-heavy steps of every stage whose `backend` is vllm (conf/backend/vllm.yaml,
the option `VLLMBackend`; `auto` picks it where vLLM and a GPU are there):
- prefix continuation (PAPER.md §2.2), evaluation (§3), teacher generation: `VLLMChatBackend.complete`,
  which keeps the `ChatBackend` contract of palign/llm/backends.py, so `complete_missing` drives it;
- the sufficiency judge's logits mode (§2.1): `VLLMChatBackend.verdict_scores`, which
  `palign.truncation.judge.SufficiencyJudge` scores with (a scoring back end, like its HFScorer).

Prompts are rendered by `palign.llm.chat` into token ids and passed as `TokensPrompt`s, so vLLM sees
exactly the tokens the Hugging Face path sees; vLLM never applies a chat template of its own. Replies
are decoded with the same tokenizer call as `generate`, and `num_tokens` counts the reply without
the end-of-turn token that stopped it, as `generate` does.

How the verdict score stays exact. The logits-mode score is log P(enough) - log P(not enough) for
the next token under the full softmax. Asking for the top-K logprobs is not enough: the verdict
tokens need not be among the top K. vLLM's V1 sampler, however, computes the returned logprobs from
the raw logits (`logprobs_mode="raw_logprobs"`, the default) before it applies `allowed_token_ids`,
and always returns the logprob of the token it sampled. So each prompt is sent twice, once with
`allowed_token_ids=[enough]` and once with `[not_enough]`, greedy, `max_tokens=1`, `logprobs=0`:
each request is forced to sample its verdict token and reports that token's full-softmax logprob.
The second request of a pair shares the whole prompt with the first, so the prefix cache makes it
cost little more than a decode step. Rejected: `prompt_logprobs` on "prompt + verdict" is exact too,
but vLLM skips the prefix cache for requests that ask for prompt logprobs; `logprobs=-1` (the whole
vocabulary) moves ~150k numbers per prompt. A processed logprobs mode (V0 engine, or
`logprobs_mode="processed_*"`) would report log 1 = 0 for a forced token; `verdict_score` detects
this (two probabilities summing to more than 1) and fails instead of returning wrong scores.

One engine at a time. Each `vllm.LLM` reserves `gpu_memory_utilization` of the GPU at startup and
refuses to start when less than that is free ("Free memory on device ... is less than desired GPU
memory utilization": vllm/v1/worker/utils.py: request_memory, from the GPU worker's init_device), so
two engines of the default 0.85 cannot live side by side. Back ends with the same model and engine
settings share one engine (the self-judge and the student's continuation, by default); starting an
engine with other settings (a judge model other than the student, the trained student in
evaluation) first shuts down the one before, and says so in the log. The stages run one after the
other over all their problems, so each engine starts once per stage. `release_vllm_engines()`
shuts the engine down, e.g. before training takes the GPU.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from palign.llm import backends
from palign.llm.backends import Backend
from palign.llm.chat import encode_user_turn
from palign.llm.generation import Generation, SamplingConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'palign[vllm]' on a CUDA machine (vLLM is GPU only; use backend=hf on CPU)"

# the running vllm.LLM by its engine arguments: one at most (see the module docstring)
_ENGINES: dict[str, Any] = {}
# context lengths read from config.json, by model path
_CONTEXT_LENGTHS: dict[str, int] = {}


def vllm_available() -> tuple[bool, str]:
    """(usable, why): vLLM is installed and a CUDA device is visible. Does not import vLLM."""
    try:
        installed = importlib.util.find_spec("vllm") is not None
    except ValueError:  # a module in sys.modules without a spec: present
        installed = True
    if not installed:
        return False, f"vLLM is not installed: {INSTALL_HINT}"
    import torch

    if not torch.cuda.is_available():
        return False, "vLLM is installed but no CUDA device is visible: the vLLM back end is GPU only (use backend=hf)"
    return True, f"vLLM on {torch.cuda.get_device_name(0)}"


def require_vllm():
    """The `vllm` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"the vLLM back end could not import vllm ({err}); {INSTALL_HINT}") from err
    return vllm


def release_vllm_engines() -> int:
    """Shut down the vLLM engines palign started and free their GPU memory; returns how many there were.

    Each goes through `llm.llm_engine.engine_core.shutdown()`, vLLM 0.33's handle on its engine core
    (vllm/v1/engine/llm_engine.py: LLMEngine.engine_core; vllm/v1/engine/core_client.py:
    SyncMPClient.shutdown ends the engine core process, which holds the GPU memory, and
    InprocClient.shutdown tears an in-process core down). Separate processes per stage
    (`stage=align`, then `stage=train`, then `stage=eval`) remain the sure way to a clean GPU.
    """
    count = len(_ENGINES)
    while _ENGINES:
        _, llm = _ENGINES.popitem()
        try:
            shutdown = llm.llm_engine.engine_core.shutdown
        except AttributeError as err:
            raise RuntimeError(
                f"cannot shut down the vLLM engine {llm!r}: it has no llm_engine.engine_core.shutdown() "
                f"({err}); palign follows vLLM 0.33's LLM (pip install 'palign[vllm]')"
            ) from err
        shutdown()
        del llm
    if count:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return count


def forced_token_request(token: int) -> dict[str, Any]:
    """SamplingParams arguments that make vLLM emit `token` and report its raw logprob."""
    return {"max_tokens": 1, "temperature": 0.0, "logprobs": 0, "allowed_token_ids": [token], "detokenize": False}


def _step_logprob(step: Mapping[int, Any], token: int, name: str) -> float:
    entry = step.get(token) if step is not None else None
    if entry is None:
        raise RuntimeError(
            f"vLLM returned no logprob for the {name} token {token} (got tokens {sorted(step or {})}); the request "
            "must force that token with allowed_token_ids and ask for logprobs"
        )
    return float(getattr(entry, "logprob", entry))


def verdict_score(
    enough_step: Mapping[int, Any], not_enough_step: Mapping[int, Any], enough_token: int, not_enough_token: int
) -> float:
    """log P(enough) - log P(not enough) from the first-step logprobs of the two forced requests.

    Each step maps token id -> logprob (a float, or vLLM's `Logprob` with a `.logprob`).
    """
    enough = _step_logprob(enough_step, enough_token, "enough")
    not_enough = _step_logprob(not_enough_step, not_enough_token, "not-enough")
    return backends.verdict_score(
        enough, not_enough, reporter="vLLM", fix="use the V1 engine with logprobs_mode=raw_logprobs"
    )


def _engine_key(args: Mapping[str, Any]) -> str:
    return json.dumps(args, sort_keys=True, default=str)


class VLLMChatBackend:
    """A local model served by vLLM; the engine starts on first use and is shared (see module docstring).

    model_path: a folder or hub id vLLM loads (`resolve_model_path`, or a trained student folder).
    tokenizer: the Hugging Face tokenizer whose chat template renders the prompts.
    chat_template_kwargs: template switches, e.g. {enable_thinking: false} for Qwen3.
    tensor_parallel_size, gpu_memory_utilization, max_model_len, enable_prefix_caching, dtype, seed:
        `vllm.LLM` arguments; `gpu_memory_utilization` is what the engine reserves (one runs at a time).
    engine_kwargs: any further `vllm.LLM` arguments (e.g. {enforce_eager: true}).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        dtype: str = "auto",
        seed: int = 0,
        engine_kwargs: Mapping[str, Any] | None = None,
    ):
        engine_kwargs = dict(engine_kwargs or {})
        if str(engine_kwargs.get("logprobs_mode", "raw_logprobs")) != "raw_logprobs":
            raise ValueError(
                f"vllm.engine_kwargs.logprobs_mode={engine_kwargs['logprobs_mode']!r}: the judge's scores need the "
                "raw logprobs (the default); remove the key"
            )
        self.model_path = str(model_path)
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.engine_args: dict[str, Any] = {
            "model": self.model_path,
            "tokenizer": tokenizer.name_or_path,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "enable_prefix_caching": enable_prefix_caching,
            "dtype": dtype,
            "seed": seed,
            **engine_kwargs,
        }

        self.clamped = 0  # requests whose max_tokens the context-length guard lowered, over this back end's life

    def context_length(self) -> int:
        """Tokens of prompt plus reply the engine admits: `vllm.max_model_len`, else the model's own
        length (config.json), which is what vLLM uses when max_model_len is unset."""
        if self.engine_args.get("max_model_len"):
            return int(self.engine_args["max_model_len"])
        if self.model_path in _CONTEXT_LENGTHS:
            return _CONTEXT_LENGTHS[self.model_path]
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.model_path)
        config = getattr(config, "get_text_config", lambda: config)()
        length = getattr(config, "max_position_embeddings", None)
        if not length:
            raise ValueError(f"{self.model_path}: config.json names no max_position_embeddings; set vllm.max_model_len")
        _CONTEXT_LENGTHS[self.model_path] = int(length)
        return int(length)

    def identity(self) -> dict[str, Any]:
        return {
            "backend": "vllm",
            "model": self.model_path,
            "tokenizer": self.tokenizer.name_or_path,
            "dtype": self.engine_args["dtype"],
            "chat_template_kwargs": self.chat_template_kwargs,
        }

    def __repr__(self) -> str:
        return f"VLLMChatBackend({self.model_path!r})"

    def _engine(self):
        """The running engine for these settings, started on first use; another one is shut down first."""
        vllm = require_vllm()
        key = _engine_key(self.engine_args)
        if key not in _ENGINES:
            usable, reason = vllm_available()
            if not usable:
                raise RuntimeError(f"cannot start vLLM for {self.model_path}: {reason}")
            if _ENGINES:
                running = ", ".join(json.loads(other)["model"] for other in _ENGINES)
                log.info(
                    "vLLM: shutting down the engine of %s to start one for %s (an engine reserves its "
                    "gpu_memory_utilization of the GPU at startup; palign runs one at a time)",
                    running,
                    self.model_path,
                )
                release_vllm_engines()
            log.info("starting vLLM for %s (%s)", self.model_path, reason)
            _ENGINES[key] = vllm.LLM(**self.engine_args)
        return _ENGINES[key]

    # -- generation (continuation, evaluation, the judge's generate mode) --------------------------
    def prompt_token_ids(self, user_texts: Sequence[str]) -> list[list[int]]:
        """The tokens of each user turn, exactly as `generate` feeds them to a Hugging Face model."""
        return [encode_user_turn(self.tokenizer, text, self.chat_template_kwargs) for text in user_texts]

    @staticmethod
    def sampling_kwargs(sampling: SamplingConfig | Mapping[str, Any]) -> dict[str, Any]:
        """SamplingParams arguments for a `SamplingConfig` (`batch_size` has no meaning for vLLM).

        What is left out keeps SamplingParams' own default, which is off for every filter and
        penalty (top_k, min_p, presence and frequency penalties); vLLM applies the model's
        generation_config.json only to requests sent without SamplingParams, which palign never does.
        """
        sampling = SamplingConfig.from_config(sampling)
        kwargs: dict[str, Any] = {
            "n": sampling.num_samples,
            "max_tokens": sampling.max_new_tokens,
            "repetition_penalty": sampling.repetition_penalty,
            # a per-request seed: a prompt's samples do not depend on which chunk or batch it ran in
            "seed": sampling.seed,
            "detokenize": False,  # decoded below with the same call as the Hugging Face path
        }
        if sampling.do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.top_k:
                kwargs["top_k"] = sampling.top_k
        else:
            kwargs["temperature"] = 0.0
        return kwargs

    def _generation(self, completion) -> Generation:
        tokens = list(completion.token_ids)
        finished = completion.finish_reason == "stop"
        if finished and tokens and not isinstance(getattr(completion, "stop_reason", None), str):
            tokens.pop()  # the end-of-turn (or stop) token vLLM keeps; `generate` does not count it
        return Generation(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True), num_tokens=len(tokens), finished=finished
        )

    def complete(
        self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any], progress: str | None = None
    ) -> list[list[Generation]]:
        """`sampling.num_samples` generations for each user turn, in input order."""
        if not user_texts:
            return []
        vllm = require_vllm()
        ids = self.prompt_token_ids(user_texts)
        kwargs = self.sampling_kwargs(sampling)
        budgets, clamped = reply_budgets([len(p) for p in ids], kwargs["max_tokens"], self.context_length())
        if clamped:
            self.clamped += clamped
            log.warning(
                "vLLM: %d of %d prompts leave less than max_new_tokens=%d tokens of the model's context of %d; "
                "their replies are capped to fit (%d capped so far)",
                clamped,
                len(ids),
                kwargs["max_tokens"],
                self.context_length(),
                self.clamped,
            )
        prompts = [vllm.TokensPrompt(prompt_token_ids=p) for p in ids]
        # one request batch for the whole chunk; one SamplingParams per request only where a budget differs
        params = (
            vllm.SamplingParams(**kwargs)
            if not clamped
            else [vllm.SamplingParams(**dict(kwargs, max_tokens=budget)) for budget in budgets]
        )
        outputs = self._engine().generate(prompts, params, use_tqdm=progress is not None)
        return [[self._generation(completion) for completion in output.outputs] for output in outputs]

    # -- the judge's logits mode ---------------------------------------------------------------------
    def verdict_scores(
        self, prompts_token_ids: Sequence[Sequence[int]], enough_token: int, not_enough_token: int
    ) -> list[float]:
        """log P(enough_token) - log P(not_enough_token) as the next token after each prompt.

        Two forced one-token requests per prompt (see the module docstring), sent side by side so
        the second can take the prompt from the prefix cache.
        """
        if not prompts_token_ids:
            return []
        vllm = require_vllm()
        prompts, params = [], []
        for ids in prompts_token_ids:
            for token in (enough_token, not_enough_token):
                prompts.append(vllm.TokensPrompt(prompt_token_ids=list(ids)))
                params.append(vllm.SamplingParams(**forced_token_request(token)))
        outputs = self._engine().generate(prompts, params, use_tqdm=False)
        return [
            verdict_score(
                outputs[i].outputs[0].logprobs[0], outputs[i + 1].outputs[0].logprobs[0], enough_token, not_enough_token
            )
            for i in range(0, len(outputs), 2)
        ]


def reply_budgets(prompt_lengths: Sequence[int], max_new_tokens: int, context: int) -> tuple[list[int], int]:
    """The context-length guard: each request's max_tokens (`max_new_tokens`, or what the prompt leaves
    of the model's `context`) and how many were lowered. A prompt that leaves no room is an error:
    vLLM would refuse the whole batch."""
    budgets = []
    for i, length in enumerate(prompt_lengths):
        room = context - length
        if room < 1:
            raise ValueError(
                f"prompt {i} has {length} tokens, which leaves no room for a reply in the model's context "
                f"of {context} tokens; raise vllm.max_model_len (up to the model's length) or shorten the "
                "inputs (e.g. data.max_length, truncation.judge.max_context_tokens)"
            )
        budgets.append(min(max_new_tokens, room))
    return budgets, sum(b < max_new_tokens for b in budgets)


def vllm_backend(
    spec_cfg: Any, cache_dir: Any, engine_cfg: Any, weights: str | None = None, tokenizer=None
) -> VLLMChatBackend:
    """The back end for a `conf/student/*.yaml` model and the `vllm:` engine settings of conf/config.yaml.

    weights: a folder that replaces the model's weights (a trained student); its tokenizer and
    chat template stay the model's own (`tokenizer`: that tokenizer, already loaded by the caller).
    Nothing starts until the back end is first used.
    """
    from omegaconf import DictConfig, OmegaConf

    from palign.llm.models import ModelSpec, load_tokenizer, resolve_model_path

    settings = (
        OmegaConf.to_container(engine_cfg, resolve=True)
        if isinstance(engine_cfg, DictConfig)
        else dict(engine_cfg or {})
    )
    known = set(inspect.signature(VLLMChatBackend).parameters) - {"model_path", "tokenizer", "chat_template_kwargs"}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(
            f"vllm config: unknown keys {sorted(unknown)}; known: {sorted(known)} (other vllm.LLM "
            "arguments go under vllm.engine_kwargs)"
        )
    spec = ModelSpec.from_config(spec_cfg)
    return VLLMChatBackend(
        weights or resolve_model_path(spec, cache_dir),
        tokenizer or load_tokenizer(spec, cache_dir),
        spec.chat_template_kwargs,
        **settings,
    )


class VLLMBackend(Backend):
    """`backend: vllm` (conf/backend/vllm.yaml): the stage's model on a vLLM engine in this process,
    with the run's `vllm:` engine settings (`engine`)."""

    def __init__(self, engine: Any):
        self.engine = backends.settings(engine)

    def available(self) -> tuple[bool, str]:
        return vllm_available()

    def problems(self, key: str, *, hardware: bool) -> list[str]:
        if not hardware:
            return []
        usable, reason = vllm_available()
        if not usable:
            return [f"{key}=vllm: {reason}"]
        import torch

        parallel, visible = self.engine.get("tensor_parallel_size", 1), torch.cuda.device_count()
        if parallel > visible:
            return [
                f"vllm.tensor_parallel_size={parallel}: this machine shows {visible} GPUs; lower it or run on a "
                "node with that many"
            ]
        return []

    def chat(self, model: Any, cache_dir: Any, *, tokenizer, weights: str | None, stage: str) -> VLLMChatBackend:
        return vllm_backend(model, cache_dir, self.engine, weights=weights, tokenizer=tokenizer)

    def __repr__(self) -> str:
        return "VLLMBackend()"
