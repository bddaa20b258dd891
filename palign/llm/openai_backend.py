"""Chat back ends: one `complete(user_texts, sampling)` for a local model or an OpenAI-compatible server.

Stages that only need "a model that answers user turns" (the chain-quality judge of the paper's
"GLM-based evaluation", PAPER.md §4 and §8; a remote teacher such as DeepSeek-R1 for
`teacher=generate`; the continuation, evaluation and the judge's generate mode) take either back end:
- `LocalChatBackend` (palign/llm/hf_backend.py): a Hugging Face model through the shared batched `generate`;
- `OpenAIChatBackend`: an OpenAI-compatible server (vLLM, transformers serve, SGLang, DeepSeek,
  Zhipu GLM, OpenAI), with a bounded thread pool, retries with exponential backoff and jitter on
  429/5xx/connection errors, and no retry on other 4xx. It also scores the sufficiency judge's
  verdicts (`verdict_scores`, the logits mode of PAPER.md §2.1) where the server can.

Both return what `generate` returns: one list of `num_samples` `Generation`s per prompt, in order.

What a server is sent. Servers that speak the OpenAI API differ in what else they take, so the back
end is told which kind it talks to (`server`), and each kind's request shapes live in one class:
- `openai` (`OpenAIAPI`, the OpenAI API itself and hosted look-alikes): chat completions with the
  standard fields (max_tokens, temperature, top_p, seed, n); palign's repetition penalty and top-k
  cannot be sent (OpenAI rejects unknown fields) and are warned about unless `extra_body` carries them.
- `vllm` (`VLLMServer`): every sampling field vLLM would otherwise fill in from the model's
  generation_config.json (its "user -> server default -> OpenAI default" rule,
  vllm/entrypoints/openai/completion/protocol.py: CompletionRequest.to_sampling_params) is sent, so
  the server's defaults decide nothing (palign/llm/generation.py says why that matters). With the
  model's tokenizer, a prompt travels as token ids on `/completions` (`prompt` as a list of ids),
  rendered by palign's chat template (palign/llm/chat.py) exactly as the in-process back ends feed
  it, and the reply comes back as token ids (`return_token_ids`) decoded as `generate` decodes.
- `transformers` (`TransformersServe`, `transformers serve`): chat completions carrying the complete
  sampling settings as its `generation_config` JSON field (palign's own `generation_config`), one
  request per sample (it ignores `n`), and sampled requests one at a time (its seed is the process's
  torch seed, set before a request queues for the model: overlapping requests draw from each
  other's stream).

Samples. A request of n samples carries `sampling.seed` (as vLLM seeds per request in process).
Where a server takes one sample per request (`supports_n: false`, a `transformers` server, or a
server seen to return fewer choices than it was asked for, which it is then never asked again)
request j of a prompt carries the j-th seed of `sample_seeds`, so a prompt's samples depend on its
text and the seed only, never on its chunk, the order or the concurrency.

Verdict scores (`verdict_scores`, the judge's logits mode) are log P(enough) - log P(not enough) of
the next token after a token-id prompt, read as palign/llm/vllm_backend.py reads them in process:
two forced one-token requests per prompt (`allowed_token_ids` of one verdict token, greedy,
`max_tokens: 1`, `logprobs: 0`), each reporting its forced token's raw logprob. Only `vllm` servers
do this; elsewhere `check_logits_mode` refuses, naming `truncation.judge.mode=logits`, before any
request. Text-only servers (a `transformers` server's `/completions` takes a string prompt only) get
the judge's prompts as chat messages in generate mode.

The API key is read from an environment variable at call time and only ever placed in the
`Authorization` header: it is not stored on the object, so it cannot reach a repr, a saved config or
a fingerprint, and it is masked in every message built from server replies (some servers echo it).
"""

from __future__ import annotations

import contextlib
import http.client
import inspect
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, is_dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from palign.llm.backends import Backend, ChatBackendError, settings, verdict_score
from palign.llm.chat import encode_user_turn
from palign.llm.generation import Generation, SamplingConfig, generation_config

log = logging.getLogger(__name__)

# 408/409/425 are transient by definition; 429 is rate limiting; 5xx are server-side failures.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
MAX_BACKOFF_S = 60.0
# Indirection so tests can record the backoff delays without sleeping.
_sleep = time.sleep


# -- the kinds of server: what each takes and how it is sent sampling settings --------------------------
class OpenAIAPI:
    """`server: openai`: the OpenAI API and hosted look-alikes (DeepSeek, Zhipu GLM): chat
    completions with the standard fields only."""

    name = "openai"
    title = "the OpenAI API (server: openai)"
    takes_n = True  # honours `n`, several samples per request
    token_prompts = False  # `/completions` takes a prompt of token ids
    verdict_logprobs = False  # forced one-token requests report the forced token's raw logprob
    takes_chat_template_kwargs = False  # a request may carry `chat_template_kwargs`
    counts_stop_token = False  # usage.completion_tokens counts the end-of-turn token of a finished reply
    process_seed = False  # a request's seed seeds the whole server process, not the request
    why_no_logits = "its endpoints take no token-id prompt with allowed_token_ids"

    def sampling_fields(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The fields of one request (of one or more samples) that carry `sampling`."""
        fields: dict[str, Any] = {"max_tokens": sampling.max_new_tokens}
        if sampling.do_sample:
            fields.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            fields["temperature"] = 0.0
        return fields

    def unsent(self, sampling: SamplingConfig) -> dict[str, Any]:
        """Settings of `sampling` that this kind of server cannot be sent (not OpenAI API parameters)."""
        wanted = {
            "repetition_penalty": sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
            "top_k": sampling.top_k or None if sampling.do_sample else None,
        }
        return {name: value for name, value in wanted.items() if value is not None}


class VLLMServer(OpenAIAPI):
    """`server: vllm`: vLLM's OpenAI-compatible server (`vllm serve`)."""

    name = "vllm"
    title = "vLLM's OpenAI server (server: vllm)"
    token_prompts = True
    verdict_logprobs = True
    takes_chat_template_kwargs = True
    counts_stop_token = True  # its token_ids keep the end-of-turn token (palign/llm/vllm_backend.py pops it)

    def sampling_fields(self, sampling: SamplingConfig) -> dict[str, Any]:
        """Every field vLLM 0.33 would otherwise take from the model's generation_config.json
        (CompletionRequest._DEFAULT_SAMPLING_PARAMS: repetition, presence and frequency penalties,
        temperature, top_p, top_k, min_p), as palign/llm/vllm_backend.py: sampling_kwargs sets them."""
        greedy = not sampling.do_sample
        return {
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if greedy else sampling.temperature,
            "top_p": 1.0 if greedy else sampling.top_p,
            "top_k": 0 if greedy else sampling.top_k or 0,  # 0: off
            "min_p": 0.0,
            "repetition_penalty": sampling.repetition_penalty,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        }

    def unsent(self, sampling: SamplingConfig) -> dict[str, Any]:
        return {}


class TransformersServe(OpenAIAPI):
    """`server: transformers`: `transformers serve` (transformers 5.20,
    transformers/cli/serving/chat_completion.py and completion.py). Its chat endpoint takes a
    `generation_config` JSON that replaces the model's own generation config (utils.py:
    BaseHandler._build_generation_config), so palign's complete `generation_config` goes there and
    only the stop tokens, which palign leaves unset, come from the model. It warns about and
    ignores `n` and `logprobs` (UNUSED_CHAT_COMPLETION_FIELDS, UNUSED_LEGACY_COMPLETION_FIELDS),
    refuses any field outside its parameter types with HTTP 422 (`top_k`, `allowed_token_ids`,
    ...: BaseHandler._validate_request), and its `/completions` takes a string prompt only."""

    name = "transformers"
    title = "transformers serve (server: transformers)"
    takes_n = False
    takes_chat_template_kwargs = True
    counts_stop_token = True  # usage counts the generated ids, the end-of-turn token among them
    process_seed = True  # BaseHandler._build_generation_config: torch.manual_seed(seed) when the request arrives
    why_no_logits = (
        "it ignores `logprobs` (transformers/cli/serving/completion.py: UNUSED_LEGACY_COMPLETION_FIELDS), "
        "refuses `allowed_token_ids` and takes only text prompts"
    )

    def sampling_fields(self, sampling: SamplingConfig) -> dict[str, Any]:
        config = generation_config(replace(sampling, num_samples=1), pad_token_id=None, eos_token_id=None)
        values = {k: v for k, v in config.to_dict().items() if v is not None and k != "transformers_version"}
        return {"generation_config": json.dumps(values, sort_keys=True)}

    def unsent(self, sampling: SamplingConfig) -> dict[str, Any]:
        return {}


SERVERS: dict[str, OpenAIAPI] = {kind.name: kind() for kind in (OpenAIAPI, VLLMServer, TransformersServe)}


def sample_seeds(seed: int, num_samples: int) -> list[int]:
    """The seed of each sample's own request, where a server is sent one sample per request: the
    draws of a generator seeded with `seed`, one per sample, as `generate` draws the seed of each of
    its batches (palign/llm/generation.py)."""
    generator = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) for _ in range(num_samples)]


class OpenAIChatBackend:
    """An OpenAI-compatible server: `complete` for generation, `verdict_scores` for the judge's logits mode.

    The first eleven arguments are the fields of the schema's `Remote` node (palign/schema.py documents
    each and holds its default; this class has none of its own): build it with `from_config(node)`,
    or outside a composed config from `palign.schema.defaults(Remote, ...)`.
    base_url: the API root, e.g. `http://127.0.0.1:8000/v1` (vLLM) or `https://api.deepseek.com`.
    model: the model name the server knows (a model folder for transformers serve).
    api_key_env: the environment variable holding the key (read at each call, sent as a Bearer
        token); None for servers without authentication.
    max_concurrency: requests in flight at once (a thread pool of this size).
    max_retries: further attempts after the first on 408/409/425/429, 5xx, connection errors and
        timeouts; the delay doubles from `backoff_s` (capped at 60 s, times a random 1-1.5 jitter
        factor) and is at least the server's `Retry-After`.
    timeout_s: per-request socket timeout.
    extra_body: further JSON fields for every request (e.g. `{priority: 1}` for vLLM); a field the
        back end sets itself (the prompt, the sampling fields of `server`, n, seed) is refused.
    include_reasoning: prepend a separate `reasoning_content`/`reasoning` field (DeepSeek-R1 and
        vLLM reasoning parsers return the chain of thought there) to the reply text.
    server: the kind of server, `openai | vllm | transformers` (`SERVERS`; see the module docstring).
    supports_n: whether a request asks for several samples with `n`; None: as the kind of server
        does (not transformers serve), and one sample per request from the first reply that brings
        fewer choices than asked for.
    tokenizer, chat_template_kwargs: the model's tokenizer and chat template switches. With a
        tokenizer a `vllm` server gets token-id prompts rendered by palign's chat template (and the
        judge's logits mode); otherwise prompts are chat messages, rendered by the server's template
        with `chat_template_kwargs` (sent where the server takes them).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None,
        max_concurrency: int,
        max_retries: int,
        backoff_s: float,
        timeout_s: float,
        extra_body: Mapping[str, Any] | None,
        include_reasoning: bool,
        server: str,
        supports_n: bool | None,
        tokenizer=None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ):
        if not base_url or not model:
            raise ValueError(
                f"OpenAIChatBackend needs a base_url and a model name, got base_url={base_url!r} model={model!r}"
            )
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError(
                f"max_concurrency must be >= 1 and max_retries >= 0, got {max_concurrency} and {max_retries}"
            )
        if server not in SERVERS:
            raise ValueError(f"OpenAI back end: server must be one of {sorted(SERVERS)}, got {server!r}")
        self.server = SERVERS[server]
        if supports_n and not self.server.takes_n:
            raise ValueError(
                f"supports_n=true, but {self.server.title} ignores `n` and returns one reply; set "
                "supports_n: false or leave it null"
            )
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.completions_url = f"{self.base_url}/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.extra_body = dict(extra_body or {})
        self.include_reasoning = include_reasoning
        self.supports_n = supports_n
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        if self.chat_template_kwargs and not self.token_prompts and not self.server.takes_chat_template_kwargs:
            raise ValueError(
                f"chat_template_kwargs {self.chat_template_kwargs} cannot be sent to {self.server.title}, "
                "which renders prompts with its own template and takes no chat_template_kwargs"
            )
        self._n_ignored = False  # the server returned fewer choices than `n`: one sample per request from then on
        self._seed_lock = threading.Lock()  # process_seed servers: one sampled request at a time
        self._warned: set[str] = set()  # unsent sampling parameters already warned about

    @classmethod
    def from_config(cls, cfg: Any, **given: Any) -> OpenAIChatBackend:
        """The back end of a `Remote` node (a composed config's, a `Remote` dataclass, or a mapping such
        as `palign.schema.defaults(Remote, base_url=..., model=...)`), plus the arguments the node does
        not hold (`tokenizer`, `chat_template_kwargs`)."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            data = OmegaConf.to_container(cfg, resolve=True)
        elif is_dataclass(cfg):
            data = asdict(cfg)
        else:
            data = dict(cfg)
        data.update(given)
        parameters = inspect.signature(cls).parameters
        unknown = set(data) - set(parameters)
        missing = [name for name, p in parameters.items() if p.default is p.empty and name not in data]
        if unknown or missing:
            raise ValueError(
                f"OpenAI back end config: unknown keys {sorted(unknown)}, missing keys {missing}; it is the "
                "schema's Remote node (palign/schema.py), e.g. palign.schema.defaults(Remote, base_url=..., "
                "model=...)"
            )
        return cls(**data)

    @property
    def token_prompts(self) -> bool:
        """Prompts travel as token ids rendered by palign's chat template (`/completions`)."""
        return self.server.token_prompts and self.tokenizer is not None

    def identity(self) -> dict[str, Any]:
        """What determines the replies (for artifact fingerprints); never the key. What this back end
        sends beyond the OpenAI API is named only where it is used, so an `openai` server's
        artifacts keep the identity they had before the other kinds existed."""
        ident: dict[str, Any] = {
            "backend": "openai",
            "base_url": self.base_url,
            "model": self.model,
            "extra_body": self.extra_body,
            "include_reasoning": self.include_reasoning,
        }
        if self.server.name != "openai":
            ident["server"] = self.server.name
        if self.supports_n is not None:
            ident["supports_n"] = self.supports_n
        if self.token_prompts:
            ident["prompt_tokens"] = {
                "tokenizer": self.tokenizer.name_or_path,
                "chat_template_kwargs": self.chat_template_kwargs,
            }
        elif self.chat_template_kwargs:
            ident["chat_template_kwargs"] = self.chat_template_kwargs
        return ident

    def __repr__(self) -> str:
        return (
            f"OpenAIChatBackend(base_url={self.base_url!r}, model={self.model!r}, server={self.server.name!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})"
        )

    # -- generation -------------------------------------------------------------------------------------
    def prompt_token_ids(self, user_texts: Sequence[str]) -> list[list[int]]:
        """The tokens of each user turn, exactly as `generate` feeds them to a Hugging Face model."""
        if self.tokenizer is None:
            raise ValueError(f"{self.base_url}: token-id prompts need the model's tokenizer (tokenizer=...)")
        return [encode_user_turn(self.tokenizer, text, self.chat_template_kwargs) for text in user_texts]

    def complete(
        self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any], progress: str | None = None
    ) -> list[list[Generation]]:
        """`sampling.num_samples` generations for each user turn, in input order."""
        sampling = SamplingConfig.from_config(sampling)
        for name, value in self.server.unsent(sampling).items():
            if name not in self.extra_body and name not in self._warned:
                log.warning(
                    "%s: %s=%s is not an OpenAI API parameter and is not sent; set server: vllm (or put it in "
                    "extra_body) for servers that accept it",
                    self.url,
                    name,
                    value,
                )
                self._warned.add(name)
        # a request the back end would refuse is refused before any is sent
        self._payload([0] if self.token_prompts else "", sampling, sampling.num_samples, sampling.seed)
        if not user_texts:
            return []
        api_key = self._api_key()
        prompts = self.prompt_token_ids(user_texts) if self.token_prompts else list(user_texts)
        return self._map(lambda prompt: self._samples(prompt, sampling, api_key), prompts, progress)

    def _sends_n(self) -> bool:
        return self.supports_n if self.supports_n is not None else self.server.takes_n and not self._n_ignored

    def _samples(self, prompt: str | list[int], sampling: SamplingConfig, api_key: str | None) -> list[Generation]:
        n = sampling.num_samples
        if n == 1 or self._sends_n():
            generations = self._request(prompt, sampling, n, sampling.seed, api_key)
            if len(generations) == n:
                return generations
            if self.supports_n:
                raise ChatBackendError(
                    f"{self.base_url}: asked for n={n} samples, the server returned {len(generations)}: "
                    "it does not honour `n`; set supports_n: false (one request per sample)"
                )
            if not self._n_ignored:
                self._n_ignored = True
                log.warning(
                    "%s: asked for n=%d samples, the server returned %d: it ignores `n`, so every sample is "
                    "now its own request, seeded from sampling.seed (set supports_n: false to say so)",
                    self.base_url,
                    n,
                    len(generations),
                )
        generations = []
        for seed in sample_seeds(sampling.seed, n):
            replies = self._request(prompt, sampling, 1, seed, api_key)
            if len(replies) != 1:
                raise ChatBackendError(f"{self.base_url}: asked for one sample, the server returned {len(replies)}")
            generations.extend(replies)
        return generations

    def _payload(self, prompt: str | list[int], sampling: SamplingConfig, n: int, seed: int) -> dict[str, Any]:
        """The request body for `n` samples of `prompt` (a user turn, or token ids for `/completions`)."""
        payload: dict[str, Any] = {"model": self.model}
        if isinstance(prompt, str):
            payload["messages"] = [{"role": "user", "content": prompt}]
            if self.chat_template_kwargs:
                payload["chat_template_kwargs"] = self.chat_template_kwargs
        else:
            payload["prompt"] = list(prompt)
        if self.server.token_prompts:
            payload["return_token_ids"] = True  # count and decode the reply as `generate` does
        payload.update(self.server.sampling_fields(sampling), seed=seed)
        if n > 1:
            payload["n"] = n
        return self._with_extra_body(payload)

    def _with_extra_body(self, payload: dict[str, Any]) -> dict[str, Any]:
        clashes = sorted(set(self.extra_body) & (set(payload) | {"n"}))
        if clashes:
            raise ValueError(
                f"{self.base_url}: extra_body sets {clashes}, which the back end sets itself for "
                f"{self.server.title} (from the stage's sampling node and prompt); remove them from "
                "extra_body and set the sampling node's values instead"
            )
        return {**payload, **self.extra_body}

    def _request(
        self, prompt: str | list[int], sampling: SamplingConfig, n: int, seed: int, api_key: str | None
    ) -> list[Generation]:
        payload = self._payload(prompt, sampling, n, seed)
        url = self.url if isinstance(prompt, str) else self.completions_url
        # a process-wide seed is set when a request arrives and drawn from when it runs: sampled
        # requests must not overlap (greedy ones draw nothing)
        one_at_a_time = self.server.process_seed and sampling.do_sample
        with self._seed_lock if one_at_a_time else contextlib.nullcontext():
            data = self._post(url, payload, api_key)
        return self._parse(data, api_key)

    def _parse(self, data: Any, api_key: str | None) -> list[Generation]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise ChatBackendError(
                f"{self.base_url}: the response has no choices: {_redact(json.dumps(data)[:300], api_key)}"
            )
        usage = data.get("usage") or {}
        total = usage.get("completion_tokens")
        # usage counts all choices together: exact for one choice, the mean for several, -1 if absent
        per_choice = -1 if total is None else round(total / len(choices))
        return [self._generation(choice, per_choice) for choice in sorted(choices, key=lambda c: c.get("index", 0))]

    def _generation(self, choice: Mapping[str, Any], counted: int) -> Generation:
        finished = choice.get("finish_reason") == "stop"
        tokens = choice.get("token_ids")
        if tokens is not None and self.tokenizer is not None:
            # as palign/llm/vllm_backend.py: _generation: the end-of-turn token vLLM keeps is not
            # counted, and the reply is decoded with the same call as `generate`'s
            tokens = list(tokens)
            if finished and tokens and not isinstance(choice.get("stop_reason"), str):
                tokens.pop()
            return Generation(
                text=self.tokenizer.decode(tokens, skip_special_tokens=True), num_tokens=len(tokens), finished=finished
            )
        if tokens is not None:
            counted = len(tokens)
        if (
            finished
            and counted > 0
            and self.server.counts_stop_token
            and not isinstance(choice.get("stop_reason"), str)
        ):
            counted -= 1  # the end-of-turn token, which `generate` does not count
        message = choice.get("message")
        if message is None:  # `/completions`
            content, reasoning = choice.get("text") or "", None
        else:
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
        if self.include_reasoning and reasoning:
            content = f"{reasoning.strip()}\n\n{content}" if content else reasoning.strip()
        return Generation(text=content, num_tokens=counted, finished=finished)

    # -- the judge's logits mode --------------------------------------------------------------------------
    def check_logits_mode(self) -> None:
        """Refuse the judge's logits mode where this server cannot score verdicts; sends nothing."""
        if not self.server.verdict_logprobs:
            raise ValueError(
                f"truncation.judge.mode=logits needs the log-probabilities of the two verdict tokens after a token-id "
                f"prompt, which {self.server.title} at {self.base_url} does not return ({self.server.why_no_logits}); "
                "use truncation.judge.mode=generate (the reply is parsed), or serve the judge with vLLM's OpenAI "
                "server (server: vllm)"
            )
        if self.tokenizer is None:
            raise ValueError(
                f"truncation.judge.mode=logits on {self.server.title} at {self.base_url} sends token-id "
                "prompts: the back end needs the judge model's tokenizer (tokenizer=...)"
            )

    def verdict_scores(
        self, prompts_token_ids: Sequence[Sequence[int]], enough_token: int, not_enough_token: int
    ) -> list[float]:
        """log P(enough_token) - log P(not_enough_token) as the next token after each prompt: two
        forced one-token `/completions` requests per prompt (see the module docstring)."""
        self.check_logits_mode()
        if not prompts_token_ids:
            return []
        api_key = self._api_key()
        requests = [(list(ids), token) for ids in prompts_token_ids for token in (enough_token, not_enough_token)]
        logprobs = self._map(lambda request: self._forced_logprob(*request, api_key), requests, None)
        fix = "start vLLM with --logprobs-mode raw_logprobs (its default)"
        return [
            verdict_score(logprobs[i], logprobs[i + 1], reporter="the server", fix=fix)
            for i in range(0, len(logprobs), 2)
        ]

    def _forced_logprob(self, prompt: list[int], token: int, api_key: str | None) -> float:
        """The raw logprob of `token` after `prompt`: greedy, `max_tokens: 1`, only `token` allowed
        (palign/llm/vllm_backend.py: forced_token_request), over vLLM's `/completions`."""
        payload = self._with_extra_body(
            {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": 0,
                "allowed_token_ids": [token],
                "return_token_ids": True,
            }
        )
        try:
            data = self._post(self.completions_url, payload, api_key)
        except ChatBackendError as err:
            if err.status in (400, 404, 422):
                raise ChatBackendError(
                    f"{err}; truncation.judge.mode=logits sends token-id prompts with allowed_token_ids "
                    "and logprobs to /completions, which vLLM's OpenAI server takes: is this a vLLM "
                    "server? (else use truncation.judge.mode=generate)",
                    status=err.status,
                ) from None
            raise
        choice = (data.get("choices") or [{}])[0] if isinstance(data, dict) else {}
        steps = (choice.get("logprobs") or {}).get("token_logprobs") or []
        if not steps or steps[0] is None:
            raise ChatBackendError(
                f"{self.completions_url}: the server returned no logprobs for a forced verdict token: "
                "truncation.judge.mode=logits needs a server that returns them (vLLM's OpenAI server); "
                "use truncation.judge.mode=generate"
            )
        if choice.get("token_ids") not in (None, [token]):
            raise ChatBackendError(
                f"{self.completions_url}: asked to emit only token {token}, the server emitted "
                f"{choice.get('token_ids')}: it does not apply allowed_token_ids"
            )
        return float(steps[0])

    # -- requests -------------------------------------------------------------------------------------------
    def _map(self, work: Callable[[Any], Any], items: Sequence[Any], progress: str | None) -> list[Any]:
        """`work` on every item in a pool of `max_concurrency` threads; the results in input order."""
        results: list[Any] = [None] * len(items)
        failed = threading.Event()

        def guarded(item: Any) -> Any:
            if failed.is_set():  # after a failure nothing more is sent (the work a thread had already begun ends)
                return None
            try:
                return work(item)
            except BaseException:
                failed.set()
                raise

        bar = tqdm(total=len(items), desc=progress, disable=progress is None, unit="prompt")
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)), thread_name_prefix="openai")
        try:
            futures = {pool.submit(guarded, item): i for i, item in enumerate(items)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        finally:
            # on the first failure, drop the queued requests instead of sending them
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return results

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ChatBackendError(
                f"{self.url}: the environment variable {self.api_key_env} holding the API key is not set; export it, "
                "or set api_key_env: null for a server without authentication"
            )
        return key

    def _post(self, url: str, payload: dict[str, Any], api_key: str | None) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            retry_after = 0.0
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    text = _redact(raw[:300].decode("utf-8", "replace"), api_key)
                    raise ChatBackendError(
                        f"{url}: the server answered 200 with a body that is not JSON: {text}"
                    ) from None
            except urllib.error.HTTPError as err:
                message = _redact(_server_message(err), api_key)
                if not (err.code in RETRYABLE_STATUS or err.code >= 500):
                    hint = (
                        "; if the server does not take `n`, set supports_n: false"
                        if payload.get("n", 1) > 1 and err.code in (400, 422)
                        else ""
                    )
                    raise ChatBackendError(
                        f"{url}: HTTP {err.code} ({message}); not retried{hint}", status=err.code
                    ) from None
                reason, status = f"HTTP {err.code} ({message})", err.code
                retry_after = _seconds(err.headers.get("Retry-After"))
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
                detail = err.reason if isinstance(err, urllib.error.URLError) else err
                reason, status = _redact(f"connection error ({type(err).__name__}: {detail})", api_key), None
            if attempt == self.max_retries:
                raise ChatBackendError(
                    f"{url}: gave up after {attempt + 1} attempts; last error: {reason}", status=status
                )
            delay = max(
                min(MAX_BACKOFF_S, self.backoff_s * 2**attempt) * random.uniform(1.0, 1.5),
                min(retry_after, MAX_BACKOFF_S),
            )
            log.warning(
                "%s: %s; retrying in %.2f s (attempt %d of %d)", url, reason, delay, attempt + 2, self.max_retries + 1
            )
            _sleep(delay)
        raise AssertionError("unreachable")


def _server_message(err: urllib.error.HTTPError) -> str:
    """The server's error text: OpenAI's `{"error": {"message": ...}}`, FastAPI's `{"detail": ...}`
    (transformers serve), else the raw body."""
    try:
        raw = err.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 (a broken error body must not hide the status)
        raw = ""
    try:
        data = json.loads(raw)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = (error.get("message") or error.get("detail")) if isinstance(error, dict) else error
        return str(message or err.reason)[:500]
    except (json.JSONDecodeError, AttributeError):
        return (raw.strip() or str(err.reason))[:500]


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0


# -- the option: `backend: openai` for any stage ------------------------------------------------------
class OpenAIBackend(Backend):
    """`backend: openai` (conf/backend/openai.yaml): the stage's model served by an OpenAI-compatible
    server elsewhere (vLLM or SGLang on a shared cluster, `transformers serve`, a hosted API). The
    settings are the schema's `Remote` node (palign/schema.py: OpenAIServer). `model` is the name
    the server knows; null: the stage's model (its trained `weights` folder for evaluation, else its
    `pretrained` id or folder), which is what `vllm serve <id>` and `transformers serve` call it.

    The stage's tokenizer travels with the back end: a `vllm` server is sent token-id prompts
    rendered by palign's chat template, exactly as in process, and scores the judge's verdicts.
    The server must serve the stage's model: what a stage stores is keyed by the stage's model
    config, not by where it ran (like every back end), so a cache computed on a server is reused in
    process and the other way round.
    """

    def __init__(self, **remote: Any):
        self.remote = settings(remote)

    def problems(self, key: str, *, hardware: bool) -> list[str]:
        # the kind of server is checked by the schema (Remote.server) and by OpenAIChatBackend
        if not self.remote.get("base_url"):
            return [f"{key}.base_url: the server's API root is not set (e.g. {key}.base_url=http://HOST:8000/v1)"]
        return []

    def check_logits_mode(self) -> None:
        """Refuse the judge's logits mode where this kind of server cannot score verdicts (before anything loads)."""
        kind = SERVERS[self.remote["server"]]
        if not kind.verdict_logprobs:
            raise ValueError(
                f"truncation.judge.mode=logits needs the log-probabilities of the two verdict tokens after a token-id "
                f"prompt, which {kind.title} does not return ({kind.why_no_logits}); "
                "use truncation.judge.mode=generate "
                "(the reply is parsed), or serve the judge with vLLM's OpenAI server (server: vllm)"
            )

    def chat(self, model: Any, cache_dir: Any, *, tokenizer, weights: str | None, stage: str) -> OpenAIChatBackend:
        named = self.remote.get("model") or weights or model.pretrained or model.name
        kind, switches = SERVERS[self.remote["server"]], dict(model.chat_template_kwargs)
        if switches and not kind.token_prompts and not kind.takes_chat_template_kwargs:
            log.warning(
                "%s: %s renders prompts with its own chat template and takes no chat_template_kwargs; "
                "%s of model '%s' are not sent",
                stage,
                kind.title,
                switches,
                model.name,
            )
            switches = {}
        return OpenAIChatBackend.from_config(
            {**self.remote, "model": named}, tokenizer=tokenizer, chat_template_kwargs=switches
        )

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.remote.get('base_url')!r}, server={self.remote.get('server')!r})"
