"""Chat back ends: one `complete(user_texts, sampling)` for a local model or an OpenAI-compatible server.

Stages that only need "a model that answers user turns" (the chain-quality judge of the paper's
"GLM-based evaluation", PAPER.md §4 and §8; a remote teacher such as DeepSeek-R1 for
`teacher=generate`) take either back end:
- `LocalChatBackend`: a Hugging Face model through the shared batched `generate`;
- `OpenAIChatBackend`: POST `{base_url}/chat/completions` on any OpenAI-compatible server (vLLM,
  SGLang, DeepSeek, Zhipu GLM, OpenAI), with a bounded thread pool, retries with exponential
  backoff and jitter on 429/5xx/connection errors, and no retry on other 4xx.

Both return what `generate` returns: one list of `num_samples` `Generation`s per prompt, in order.

The API key is read from an environment variable at call time and only ever placed in the
`Authorization` header: it is not stored on the object, so it cannot reach a repr, a saved config or
a fingerprint, and it is masked in every message built from server replies (some servers echo it).
"""

from __future__ import annotations

import http.client
import inspect
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Protocol

from tqdm.auto import tqdm

from palign.llm.generation import Generation, SamplingConfig, generate

log = logging.getLogger(__name__)

# 408/409/425 are transient by definition; 429 is rate limiting; 5xx are server-side failures.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
MAX_BACKOFF_S = 60.0
# Indirection so tests can record the backoff delays without sleeping.
_sleep = time.sleep


class ChatBackend(Protocol):
    def complete(self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any]) -> list[list[Generation]]: ...

    def identity(self) -> dict[str, Any]: ...


class ChatBackendError(RuntimeError):
    """A request the back end could not complete; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LocalChatBackend:
    """A local Hugging Face model; loaded on the first `complete`, then kept."""

    def __init__(
        self,
        model_loader: Callable[[], Any],
        tokenizer,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        identity: Mapping[str, Any] | None = None,
    ):
        self.model_loader = model_loader
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._identity = dict(identity) if identity is not None else {"tokenizer": tokenizer.name_or_path}
        self._model = None

    def complete(
        self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any], progress: str | None = None
    ) -> list[list[Generation]]:
        if self._model is None:
            self._model = self.model_loader()
        return generate(self._model, self.tokenizer, user_texts, sampling, self.chat_template_kwargs, progress)

    def identity(self) -> dict[str, Any]:
        return {"backend": "local", **self._identity}

    def __repr__(self) -> str:
        return f"LocalChatBackend({self._identity.get('name', self.tokenizer.name_or_path)!r})"


class OpenAIChatBackend:
    """An OpenAI-compatible `/chat/completions` endpoint.

    base_url: the API root, e.g. `http://127.0.0.1:8000/v1` (vLLM) or `https://api.deepseek.com`.
    model: the model name the server knows, e.g. `glm-4.5`, `deepseek-reasoner`.
    api_key_env: the environment variable holding the key (read at each call, sent as a Bearer
        token); None for servers without authentication.
    max_concurrency: requests in flight at once (a thread pool of this size).
    max_retries: further attempts after the first on 408/409/425/429, 5xx, connection errors and
        timeouts; the delay doubles from `backoff_s` (capped at 60 s, times a random 1-1.5 jitter
        factor) and is at least the server's `Retry-After`.
    timeout_s: per-request socket timeout.
    extra_body: extra JSON fields for every request, e.g. `{repetition_penalty: 1.05}` or
        `{chat_template_kwargs: {enable_thinking: false}}` for vLLM; `repetition_penalty` and `top_k`
        are not OpenAI parameters (OpenAI rejects them), so they are sent only from here. A vLLM
        server adds the model's generation_config.json defaults (e.g. top_k 20 for Qwen) to what a
        request leaves out unless started with `--generation-config vllm`.
    include_reasoning: prepend a separate `reasoning_content`/`reasoning` field (DeepSeek-R1 and
        vLLM reasoning parsers return the chain of thought there) to the reply text.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 4,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 120,
        extra_body: Mapping[str, Any] | None = None,
        include_reasoning: bool = True,
    ):
        if not base_url or not model:
            raise ValueError(f"OpenAIChatBackend needs a base_url and a model name, got base_url={base_url!r} model={model!r}")
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError(f"max_concurrency must be >= 1 and max_retries >= 0, got {max_concurrency} and {max_retries}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.extra_body = dict(extra_body or {})
        self.include_reasoning = include_reasoning
        self._warned: set[str] = set()  # unsent sampling parameters already warned about

    @classmethod
    def from_config(cls, cfg: Any) -> OpenAIChatBackend:
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        known = set(inspect.signature(cls).parameters)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"OpenAI back end config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """What determines the replies (for artifact fingerprints); never the key."""
        return {"backend": "openai", "base_url": self.base_url, "model": self.model, "extra_body": self.extra_body,
                "include_reasoning": self.include_reasoning}

    def __repr__(self) -> str:
        return (f"OpenAIChatBackend(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})")

    def complete(
        self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any], progress: str | None = None
    ) -> list[list[Generation]]:
        sampling = SamplingConfig.from_config(sampling)
        configured = {"repetition_penalty": sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
                      "top_k": sampling.top_k or None if sampling.do_sample else None}
        for name, value in configured.items():
            if value is not None and name not in self.extra_body and name not in self._warned:
                log.warning("%s: %s=%s is not an OpenAI API parameter and is not sent; put it in extra_body for "
                            "servers that accept it (vLLM, SGLang)", self.url, name, value)
                self._warned.add(name)
        if not user_texts:
            return []
        api_key = self._api_key()
        results: list[list[Generation] | None] = [None] * len(user_texts)
        bar = tqdm(total=len(user_texts), desc=progress, disable=progress is None, unit="prompt")
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(user_texts)), thread_name_prefix="openai")
        try:
            futures = {pool.submit(self._complete_one, text, sampling, api_key): i for i, text in enumerate(user_texts)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        finally:
            # on the first failure, drop the queued prompts instead of sending them
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return results  # type: ignore[return-value]

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

    def _complete_one(self, text: str, sampling: SamplingConfig, api_key: str | None) -> list[Generation]:
        generations: list[Generation] = []
        while len(generations) < sampling.num_samples:
            # servers that ignore `n` return fewer choices: ask again for the rest, with another seed
            payload = self._payload(text, sampling, n=sampling.num_samples - len(generations), seed=sampling.seed + len(generations))
            generations.extend(self._parse(self._post(payload, api_key), api_key))
        return generations[: sampling.num_samples]

    def _payload(self, text: str, sampling: SamplingConfig, n: int, seed: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": sampling.max_new_tokens,
            "n": n,
            "seed": seed,
        }
        if sampling.do_sample:
            payload.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            payload["temperature"] = 0.0
        payload.update(self.extra_body)
        return payload

    def _parse(self, data: Any, api_key: str | None) -> list[Generation]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise ChatBackendError(f"{self.url}: the response has no choices: {_redact(json.dumps(data)[:300], api_key)}")
        usage = data.get("usage") or {}
        total = usage.get("completion_tokens")
        # usage counts all choices together: exact for one choice, the mean for several, -1 if absent
        per_choice = -1 if total is None else round(total / len(choices))
        generations = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0)):
            message = choice.get("message") or {}
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if self.include_reasoning and reasoning:
                content = f"{reasoning.strip()}\n\n{content}" if content else reasoning.strip()
            generations.append(Generation(text=content, num_tokens=per_choice, finished=choice.get("finish_reason") == "stop"))
        return generations

    def _post(self, payload: dict[str, Any], api_key: str | None) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            retry_after = 0.0
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise ChatBackendError(
                        f"{self.url}: the server answered 200 with a body that is not JSON: {_redact(raw[:300].decode('utf-8', 'replace'), api_key)}"
                    ) from None
            except urllib.error.HTTPError as err:
                message = _redact(_server_message(err), api_key)
                if not (err.code in RETRYABLE_STATUS or err.code >= 500):
                    raise ChatBackendError(f"{self.url}: HTTP {err.code} ({message}); not retried", status=err.code) from None
                reason, status = f"HTTP {err.code} ({message})", err.code
                retry_after = _seconds(err.headers.get("Retry-After"))
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
                detail = err.reason if isinstance(err, urllib.error.URLError) else err
                reason, status = _redact(f"connection error ({type(err).__name__}: {detail})", api_key), None
            if attempt == self.max_retries:
                raise ChatBackendError(f"{self.url}: gave up after {attempt + 1} attempts; last error: {reason}", status=status)
            delay = max(min(MAX_BACKOFF_S, self.backoff_s * 2**attempt) * random.uniform(1.0, 1.5), min(retry_after, MAX_BACKOFF_S))
            log.warning("%s: %s; retrying in %.2f s (attempt %d of %d)", self.url, reason, delay, attempt + 2, self.max_retries + 1)
            _sleep(delay)
        raise AssertionError("unreachable")


def _server_message(err: urllib.error.HTTPError) -> str:
    """The server's error text: OpenAI's `{"error": {"message": ...}}`, else the raw body."""
    try:
        raw = err.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 (a broken error body must not hide the status)
        raw = ""
    try:
        data = json.loads(raw)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message") if isinstance(error, dict) else error
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
