"""The OpenAI-compatible back end against a real HTTP server on loopback that serves the tiny local model.

`ServedModels` is a small OpenAI-compatible `/v1/chat/completions` server (ThreadingHTTPServer in a
thread) that checks the Bearer key, answers with `palign.llm.generation.generate` on real models,
and can be told to fail its next requests with given statuses or to hold each request a while
(to measure how many the client keeps in flight).
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from palign.llm import openai_backend
from palign.llm.generation import SamplingConfig, generate
from palign.llm.models import load_tokenizer
from palign.llm.openai_backend import ChatBackendError, LocalChatBackend, OpenAIChatBackend

KEY_ENV = "PALIGN_TEST_API_KEY"
SERVER_KEY = "sk-test-SERVERKEY-1234567890"
GREEDY = SamplingConfig(max_new_tokens=6, do_sample=False, repetition_penalty=1.0, batch_size=1)
PROMPTS = ["What is 2 + 3?", "Solve x^2 = 4 for x > 0.", "Name a prime number larger than 10."]


class ServedModels:
    """An OpenAI-compatible chat completions server for local models, keyed by model name."""

    def __init__(self, models: dict, api_key: str):
        self.models, self.api_key = models, api_key
        self.fail_next: list[int] = []  # statuses to answer the next requests with, in order
        self.retry_after: str | None = None  # Retry-After header sent with those failures
        self.delay_s = 0.0  # hold each request this long before generating
        self.requests = self.in_flight = self.max_in_flight = 0
        self._state_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one generation at a time: torch seeds are global
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def reset(self) -> None:
        self.fail_next, self.retry_after, self.delay_s = [], None, 0.0
        self.requests = self.in_flight = self.max_in_flight = 0

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _answer(self, body: dict) -> tuple[int, dict]:
        if body.get("model") not in self.models:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist", "type": "invalid_request_error"}}
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            return 400, {"error": {"message": "messages must end with a user message", "type": "invalid_request_error"}}
        max_tokens, n = body.get("max_tokens", 16), body.get("n", 1)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return 400, {"error": {"message": f"max_tokens must be at least 1, got {max_tokens}", "type": "invalid_request_error"}}
        temperature = body.get("temperature", 1.0)
        if temperature == 0 and n > 1:
            return 400, {"error": {"message": "greedy decoding supports n=1 only", "type": "invalid_request_error"}}
        model, tokenizer = self.models[body["model"]]
        sampling = SamplingConfig(
            max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
            top_p=body.get("top_p", 1.0), repetition_penalty=body.get("repetition_penalty", 1.0),
            num_samples=n, batch_size=1, seed=body.get("seed", 0),
        )
        time.sleep(self.delay_s)
        with self._model_lock:
            (generations,) = generate(model, tokenizer, [messages[-1]["content"]], sampling)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": "stop" if g.finished else "length"}
            for i, g in enumerate(generations)
        ]
        completion_tokens = sum(g.num_tokens for g in generations)
        return 200, {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                     "choices": choices, "usage": {"completion_tokens": completion_tokens}}

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                with server._state_lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    failure = server.fail_next.pop(0) if server.fail_next else None
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": f"no route {self.path}"}})
                    if failure is not None:
                        headers = {"Retry-After": server.retry_after} if server.retry_after else {}
                        return self._send(failure, {"error": {"message": f"simulated failure {failure}"}}, headers)
                    given = self.headers.get("Authorization", "")
                    if given != f"Bearer {server.api_key}":
                        # like OpenAI's own 401, the message quotes the key it was given
                        return self._send(401, {"error": {"message": f"Incorrect API key provided: {given.removeprefix('Bearer ')}",
                                                          "type": "invalid_request_error"}})
                    self._send(*server._answer(body))
                finally:
                    with server._state_lock:
                        server.in_flight -= 1

        return Handler


def always_stopping(model, eos_id: int):
    """A copy of `model` whose output layer strongly prefers the end-of-turn token (replies end at once)."""
    stopping = copy.deepcopy(model)
    old = stopping.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_id] = 1e4
    stopping.lm_head = head
    return stopping


@pytest.fixture(scope="module")
def tiny_tokenizer(student_specs, cache_dir):
    return load_tokenizer(student_specs["tiny_random"], cache_dir)


@pytest.fixture(scope="module")
def served(tiny_model, tiny_tokenizer):
    server = ServedModels(
        {"tiny": (tiny_model, tiny_tokenizer), "tiny-stops": (always_stopping(tiny_model, tiny_tokenizer.eos_token_id), tiny_tokenizer)},
        api_key=SERVER_KEY,
    )
    yield server
    server.close()


@pytest.fixture
def server(served, monkeypatch):
    served.reset()
    monkeypatch.setenv(KEY_ENV, SERVER_KEY)
    return served


@pytest.fixture
def sleeps(monkeypatch):
    """Record backoff delays instead of sleeping."""
    recorded: list[float] = []
    monkeypatch.setattr(openai_backend, "_sleep", recorded.append)
    return recorded


def backend(server, model="tiny", **kw) -> OpenAIChatBackend:
    return OpenAIChatBackend(server.base_url, model, api_key_env=KEY_ENV, **kw)


def test_http_backend_returns_what_the_local_model_generates(server, tiny_model, tiny_tokenizer):
    remote = backend(server).complete(PROMPTS, GREEDY)
    local = LocalChatBackend(lambda: tiny_model, tiny_tokenizer).complete(PROMPTS, GREEDY)
    assert [len(g) for g in remote] == [1, 1, 1]
    assert [[(g.text, g.num_tokens, g.finished) for g in gens] for gens in remote] == \
           [[(g.text, g.num_tokens, g.finished) for g in gens] for gens in local]
    assert all(not g.finished and g.num_tokens == 6 for gens in remote for g in gens)  # cut at max_tokens: "length"
    assert server.requests == 3


def test_samples_per_prompt_and_stop_flag(server):
    sampling = SamplingConfig(max_new_tokens=5, do_sample=True, temperature=1.0, top_p=1.0, num_samples=3, seed=1)
    outputs = backend(server).complete(PROMPTS[:2], sampling)
    assert [len(gens) for gens in outputs] == [3, 3]
    assert all(not g.finished and g.num_tokens == 5 for gens in outputs for g in gens)
    assert len({g.text for g in outputs[0]}) > 1  # n independent samples, not one copied
    stopped = backend(server, model="tiny-stops").complete(PROMPTS[:2], GREEDY)
    assert all(g.finished and g.text == "" and g.num_tokens == 0 for gens in stopped for g in gens)  # finish_reason "stop"


def test_api_key_is_required_and_never_leaks(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    client = backend(server)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ChatBackendError, match=KEY_ENV):
        client.complete(PROMPTS[:1], GREEDY)
    assert server.requests == 0

    wrong = "sk-wrong-CLIENTSECRET-987654"
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(ChatBackendError) as caught:
        client.complete(PROMPTS[:1], GREEDY)
    error = caught.value
    assert error.status == 401 and "401" in str(error) and "Incorrect API key" in str(error)
    assert server.requests == 1  # a 401 is not retried
    full_traceback = "".join(traceback.format_exception(error))
    for text in (str(error), full_traceback, caplog.text, repr(client), str(vars(client)), json.dumps(client.identity())):
        assert wrong not in text  # the server echoed it; the client masks it

    monkeypatch.setenv(KEY_ENV, SERVER_KEY)  # read at call time: the same client now works
    assert len(client.complete(PROMPTS[:1], GREEDY)) == 1
    assert SERVER_KEY not in caplog.text + repr(client) + str(vars(client))


def test_429_and_503_are_retried_with_backoff(server, sleeps, caplog):
    server.fail_next, server.retry_after = [429, 503], "2"
    outputs = backend(server, backoff_s=0.5, max_retries=3).complete(PROMPTS[:1], GREEDY)
    assert len(outputs) == 1 and len(outputs[0]) == 1
    assert server.requests == 3
    assert len(sleeps) == 2 and min(sleeps) >= 2.0  # the server's Retry-After beats the 0.5-1.5 s backoff
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("HTTP 429" in w for w in warnings) and any("HTTP 503" in w for w in warnings)


def test_backoff_doubles_and_retries_run_out(server, sleeps):
    server.fail_next = [503] * 3
    with pytest.raises(ChatBackendError, match=r"gave up after 3 attempts.*HTTP 503") as caught:
        backend(server, backoff_s=0.1, max_retries=2).complete(PROMPTS[:1], GREEDY)
    assert caught.value.status == 503 and server.requests == 3
    assert 0.1 <= sleeps[0] <= 0.15 and 0.2 <= sleeps[1] <= 0.3


def test_400_and_404_are_not_retried(server, sleeps):
    with pytest.raises(ChatBackendError, match=r"HTTP 400 \(max_tokens must be at least 1, got 0\); not retried") as caught:
        backend(server).complete(PROMPTS[:1], SamplingConfig(max_new_tokens=0, do_sample=False))
    assert caught.value.status == 400
    with pytest.raises(ChatBackendError, match=r"HTTP 404 .*no-such-model"):
        backend(server, model="no-such-model").complete(PROMPTS[:1], GREEDY)
    assert server.requests == 2 and sleeps == []


def test_connection_errors_are_retried(sleeps, monkeypatch):
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv(KEY_ENV, "sk-unused")
    client = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "tiny", api_key_env=KEY_ENV, max_retries=2, backoff_s=0.01)
    with pytest.raises(ChatBackendError, match=r"gave up after 3 attempts; last error: connection error"):
        client.complete(PROMPTS[:1], GREEDY)
    assert len(sleeps) == 2


def test_concurrency_limit(server):
    server.delay_s = 0.2
    outputs = backend(server, max_concurrency=2).complete(PROMPTS * 2, GREEDY)
    assert len(outputs) == 6 and server.requests == 6
    assert server.max_in_flight == 2  # never more than the limit, and the pool does run requests in parallel
    assert [gens[0].text for gens in outputs[:3]] == [gens[0].text for gens in outputs[3:]]  # results in input order
