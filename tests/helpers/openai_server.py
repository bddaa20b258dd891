"""Servers for the OpenAI back end's tests (tests/llm/test_openai_backend.py), all on loopback.

- `TransformersServer`: the real thing, `transformers serve` (transformers' `serving` extra) in a
  process of its own, serving local model folders by path (the Hub is never reached), its HOME,
  caches and log under the test session's temporary folder; `stop()` leaves no process behind.
- `FaultProxy`: a small HTTP proxy in front of a server, for what a real server does not do on
  demand: it answers the next requests with given statuses (and a Retry-After), holds each
  request a while, checks a Bearer key (transformers serve checks none) and quotes a wrong one back
  as OpenAI does; it records every request body and how many were in flight at once.
- `VLLMCompletionsServer`: vLLM 0.33's OpenAI `/v1/completions` for what palign sends it (a
  token-id prompt; greedy or seeded sampling; `n`; `logprobs`; `allowed_token_ids`;
  `return_token_ids`), on the strict vLLM stand-in engine of tests/helpers/vllm_standin.py over the real
  checkpoint: vLLM itself is GPU only and transformers serve returns no logprobs. Each rule names
  the vLLM file it follows; a field vLLM would ignore is recorded (vLLM logs and ignores it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.helpers import vllm_standin

READY_TIMEOUT_S = 180  # loading torch and transformers on 2 shared cores
STOP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TransformersServer:
    """`transformers serve` on 127.0.0.1, in a process of its own, on the CPU. It serves any local
    model folder a request names (`model`: the folder's path), loading it on first use and keeping
    it (`--model-timeout -1`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        home = folder / "home"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "serve.log"
        self.env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV") if k in os.environ}
        self.env.update(
            HOME=str(home),
            TMPDIR=str(home / "tmp"),
            HF_HOME=str(home / "hf"),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        self.process: subprocess.Popen | None = None
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            if self._start():
                return
        raise RuntimeError(f"transformers serve did not start; its log ({self.log_path}):\n{self.log_tail()}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _start(self) -> bool:
        command = [
            sys.executable,
            "-c",
            "import sys; from transformers.cli.transformers import main; sys.exit(main())",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--model-timeout",
            "-1",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"transformers serve was not ready after {READY_TIMEOUT_S} s; its log:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # uvicorn shuts down on SIGTERM
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)


class LoopbackServer:
    """An HTTP server of this process on a free loopback port, answering with `_handler_class()` in a
    daemon thread; `base_url` is its OpenAI API root."""

    def _serve(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError


class FaultProxy(LoopbackServer):
    """Forwards POSTs to `upstream` (a server's root, e.g. http://127.0.0.1:8000), unless told otherwise."""

    def __init__(self, upstream: str, api_key: str | None = None):
        self.upstream = upstream.rstrip("/")
        self.api_key = api_key  # when set, a request without `Authorization: Bearer <api_key>` gets a 401
        self._lock = threading.Lock()
        self.reset()
        self._serve()

    def reset(self) -> None:
        self.fail_next: list[int] = []  # statuses to answer the next requests with, in order
        self.retry_after: str | None = None  # the Retry-After header of those answers
        self.delay_s = 0.0  # hold each request this long before forwarding it
        self.requests: list[tuple[str, dict]] = []  # (path, body) of every request, in arrival order
        self.in_flight = self.max_in_flight = 0

    def bodies(self, path: str | None = None) -> list[dict]:
        return [body for p, body in self.requests if path is None or p == path]

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy._lock:
                    proxy.requests.append((self.path, json.loads(raw or b"{}")))
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                    failure = proxy.fail_next.pop(0) if proxy.fail_next else None
                try:
                    json_type = {"Content-Type": "application/json"}
                    if failure is not None:
                        headers = dict(json_type, **({"Retry-After": proxy.retry_after} if proxy.retry_after else {}))
                        body = {"error": {"message": f"simulated failure {failure}"}}
                        return self._send(failure, json.dumps(body).encode(), headers)
                    given = self.headers.get("Authorization", "")
                    if proxy.api_key is not None and given != f"Bearer {proxy.api_key}":
                        # like OpenAI's own 401, the message quotes the key it was given
                        body = {
                            "error": {
                                "message": f"Incorrect API key provided: {given.removeprefix('Bearer ')}",
                                "type": "invalid_request_error",
                            }
                        }
                        return self._send(401, json.dumps(body).encode(), json_type)
                    time.sleep(proxy.delay_s)
                    request = urllib.request.Request(
                        proxy.upstream + self.path,
                        data=raw,
                        method="POST",
                        headers={"Content-Type": "application/json"},
                    )
                    try:
                        with urllib.request.urlopen(request, timeout=600) as response:
                            status, data, kind = response.status, response.read(), response.headers.get("Content-Type")
                    except urllib.error.HTTPError as err:
                        status, data, kind = err.code, err.read(), err.headers.get("Content-Type")
                    self._send(status, data, {"Content-Type": kind or "application/json"})
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

        return Handler


# -- vLLM's /v1/completions ---------------------------------------------------------------------------
# vllm/entrypoints/openai/completion/protocol.py: CompletionRequest's fields (vLLM 0.33); any other
# field is logged and ignored (vllm/entrypoints/serve/engine/protocol.py: OpenAIBaseModel, extra="allow")
COMPLETION_FIELDS = frozenset(
    """
model prompt echo frequency_penalty logit_bias logprobs max_tokens n presence_penalty seed stop stream
stream_options suffix temperature top_p user use_beam_search top_k min_p repetition_penalty watermarking
length_penalty stop_token_ids include_stop_str_in_output ignore_eos min_tokens skip_special_tokens
spaces_between_special_tokens truncate_prompt_tokens truncation_side allowed_token_ids prompt_logprobs
logprob_token_ids bad_words prompt_embeds add_special_tokens response_format structured_outputs priority
request_id session_id return_tokens_as_token_ids return_token_ids return_weight_versions
routed_experts_prompt_start return_token_offsets mm_payload return_mm_kwargs cache_salt kv_transfer_params
ec_transfer_params vllm_xargs repetition_detection thinking_token_budget stream_interval
""".split()
)
# CompletionRequest._DEFAULT_SAMPLING_PARAMS: a field the request leaves out takes the server's default
# (the model's generation_config.json), else this
DEFAULT_SAMPLING = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}
# vllm/config/model.py: ModelConfig.get_diff_sampling_param: what the server reads from generation_config.json
SERVER_DEFAULT_FIELDS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "max_new_tokens",
)
# the request features this server simulates; a request that sets another one gets a 501
SIMULATED = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "n",
        "seed",
        "logprobs",
        "allowed_token_ids",
        "return_token_ids",
        *DEFAULT_SAMPLING,
    }
)


class VLLMCompletionsServer(LoopbackServer):
    """`vllm serve <model_path> --served-model-name <name>` (default `--generation-config auto`),
    `/v1/completions` only."""

    def __init__(
        self, model_path: str, name: str, gpu_memory_utilization: float = 0.9, logprobs_mode: str = "raw_logprobs"
    ):
        self.name = name
        # the stand-in's `vllm` module; `logprobs_mode` plays an engine started with that --logprobs-mode
        self.vllm = vllm_standin.module(vllm_standin.HFModel, default_logprobs_mode=logprobs_mode)
        self.llm = self.vllm.LLM(model=model_path, tokenizer=model_path, gpu_memory_utilization=gpu_memory_utilization)
        self.tokenizer = self.llm.get_tokenizer()
        config = self.llm.model_config.generation_config
        self.server_defaults = {k: config[k] for k in SERVER_DEFAULT_FIELDS if config.get(k) is not None}
        self.ignored: list[set[str]] = []  # fields of each request that vLLM would ignore
        self._engine_lock = threading.Lock()
        self._serve()

    def close(self) -> None:
        super().close()
        self.vllm.LLM.started.clear()

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.ignored.append(set(body) - COMPLETION_FIELDS)
        unsimulated = (set(body) & COMPLETION_FIELDS) - SIMULATED
        if unsimulated:
            return 501, {"error": {"message": f"the stand-in vLLM server does not simulate {sorted(unsimulated)}"}}
        if body.get("model") not in (None, self.name):  # vllm/entrypoints/openai/engine/serving.py: _check_model
            return 404, {
                "error": {
                    "message": f"The model `{body.get('model')}` does not exist.",
                    "type": "NotFoundError",
                    "code": 404,
                }
            }
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            return 501, {"error": {"message": "the stand-in vLLM server takes one token-id prompt only"}}
        # CompletionRequest.to_sampling_params: user -> server default -> OpenAI default
        sampling = {
            name: body[name] if body.get(name) is not None else self.server_defaults.get(name, default)
            for name, default in DEFAULT_SAMPLING.items()
        }
        # normalize_null_max_tokens (16), then vllm/entrypoints/serve/utils/api_utils.py: get_max_tokens
        requested = body.get("max_tokens") or self.server_defaults.get("max_new_tokens") or 16
        max_tokens = min(requested, self.llm.model_config.max_model_len - len(prompt))
        try:
            params = self.vllm.SamplingParams(
                n=body.get("n", 1),
                seed=body.get("seed"),
                max_tokens=max_tokens,
                logprobs=body.get("logprobs"),
                allowed_token_ids=body.get("allowed_token_ids"),
                detokenize=False,
                **sampling,
            )
            with self._engine_lock:
                (output,) = self.llm.generate([self.vllm.TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        except vllm_standin.VLLMValidationError as err:
            return 400, {"error": {"message": str(err), "type": "BadRequestError", "code": 400}}
        choices = []
        for completion in output.outputs:
            choice = {
                "index": len(choices),
                "text": self.tokenizer.decode(completion.token_ids, skip_special_tokens=True),
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason,
                "logprobs": None,
            }
            if body.get("logprobs") is not None:  # serving.py: _create_completion_logprobs
                tokens = [self.tokenizer.decode([t]) for t in completion.token_ids]
                choice["logprobs"] = {
                    "tokens": tokens,
                    "token_logprobs": [
                        max(step[t].logprob, -9999.0) for step, t in zip(completion.logprobs, completion.token_ids)
                    ],
                    "top_logprobs": [
                        {self.tokenizer.decode([t]): max(lp.logprob, -9999.0) for t, lp in step.items()}
                        for step in completion.logprobs
                    ],
                    "text_offset": [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))],
                }
            if body.get("return_token_ids"):
                choice["token_ids"] = list(completion.token_ids)
            choices.append(choice)
        generated = sum(len(c.token_ids) for c in output.outputs)
        return 200, {
            "id": "cmpl-standin",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": generated,
                "total_tokens": len(prompt) + generated,
            },
        }

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/v1/completions":
                    status, payload = server.answer(body)
                else:
                    status, payload = 404, {"error": {"message": f"no route {self.path} in the stand-in"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
