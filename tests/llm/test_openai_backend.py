"""The OpenAI-compatible back end against real servers on loopback (tests/helpers/openai_server.py).

`transformers serve` (a process of its own, started once per session on a free port) serves the
tiny random Llama, two variants of it written under the session's temporary folder, and SmolLM2
(slow tests), each from its local folder. A `FaultProxy` in front of it records every request and
plays what a real server does not do on demand (429/5xx, Retry-After, slow answers, a key check).
The judge's logits mode needs a server that returns log-probabilities, which transformers serve does
not: there `VLLMCompletionsServer` plays vLLM's `/v1/completions` on the strict vLLM stand-in engine.

What transformers serve is, found here: deterministic under greedy decoding (its replies equal the
in-process `generate` on the same model), and reproducible with a seed only one sampled request at
a time (the seed is the process's torch seed, set when a request arrives), which the back end
ensures for `server: transformers`.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from palign.alignment.continuation import continuation_prompt
from palign.llm import openai_backend
from palign.llm import vllm_backend as vb
from palign.llm.backends import ChatBackendError, complete_missing
from palign.llm.chat import encode_user_turn, instruction_prompt
from palign.llm.generation import SamplingConfig, generation_config
from palign.llm.hf_backend import LocalChatBackend
from palign.llm.models import load_model, resolve_model_path
from palign.llm.openai_backend import OpenAIChatBackend, sample_seeds
from palign.schema import JudgePrompt, Remote, defaults
from palign.truncation.judge import SCORE_TOLERANCE, SufficiencyJudge, render_prompt
from tests.conftest import PROJECT_ROOT, compose_config
from tests.helpers.openai_server import VLLMCompletionsServer

KEY_ENV = "PALIGN_TEST_API_KEY"
SERVER_KEY = "sk-test-SERVERKEY-1234567890"
GREEDY = SamplingConfig(max_new_tokens=6, do_sample=False, repetition_penalty=1.0, batch_size=1)
PROMPTS = ["What is 2 + 3?", "Solve x^2 = 4 for x > 0.", "Name a prime number larger than 10."]
PAPER_PROMPTS = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "prompts" / "paper.yaml"))
QUESTION = "Solve x^2 = 9 for positive x."
TRACE = "We have $x^2 = 9$. So $x = 3$ or $x = -3$.\n\nSince x > 0, x = 3. Check: 3.5 is not it. Done!"
PREFIXES = ["We have $x^2 = 9$.", "We have $x^2 = 9$. So $x = 3$ or $x = -3$.", TRACE]


def paper_judge_prompt() -> JudgePrompt:
    return JudgePrompt(
        **OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "truncation" / "judge_prompt" / "paper.yaml"))
    )


def remote(base_url: str, model: str, **settings) -> OpenAIChatBackend:
    """A back end at the schema's `Remote` defaults but `settings` (no key unless given)."""
    fields = set(defaults(Remote)) | {"base_url", "model"}
    node = defaults(
        Remote,
        **{
            "base_url": base_url,
            "model": model,
            "api_key_env": None,
            **{k: v for k, v in settings.items() if k in fields},
        },
    )
    return OpenAIChatBackend.from_config(node, **{k: v for k, v in settings.items() if k not in fields})


def triples(outputs) -> list[list[tuple]]:
    return [[(g.text, g.num_tokens, g.finished) for g in gens] for gens in outputs]


# -- the servers: transformers serve and the proxy in front of it are tests/conftest.py's (shared with
# tests/llm/test_openai_stages.py); model variants written for this file -------------------------------
def variant(tmp_path_factory, tiny_path: str, name: str, generation_config_json: dict) -> str:
    """A copy of the tiny model whose generation_config.json is `generation_config_json`."""
    folder = tmp_path_factory.mktemp("models") / name
    shutil.copytree(tiny_path, folder, ignore=shutil.ignore_patterns("generation_config.json"))
    (folder / "generation_config.json").write_text(json.dumps(generation_config_json))
    return str(folder)


@pytest.fixture(scope="session")
def opinionated_path(tmp_path_factory, tiny_path) -> str:
    """The tiny model with sampling defaults of its own, which a server applies to whatever a request
    leaves out (palign's requests leave out nothing)."""
    return variant(
        tmp_path_factory,
        tiny_path,
        "tiny-opinionated",
        {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "do_sample": True,
            "temperature": 0.3,
            "top_k": 3,
            "top_p": 0.5,
            "repetition_penalty": 1.8,
        },
    )


@pytest.fixture(scope="session")
def stopping_path(tmp_path_factory, tiny_path, tiny_model, tiny_tokenizer) -> str:
    """The tiny model whose generation_config lists, beside <|im_end|>, the token it greedily starts
    each of PROMPTS with as an end-of-turn token: every greedy reply to them ends at once."""
    firsts = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([encode_user_turn(tiny_tokenizer, text)])
            firsts.append(int(tiny_model(input_ids=ids).logits[0, -1].argmax()))
    return variant(
        tmp_path_factory,
        tiny_path,
        "tiny-stops",
        {"bos_token_id": 1, "eos_token_id": sorted({2, *firsts}), "pad_token_id": 2},
    )


@pytest.fixture
def sleeps(monkeypatch):
    """Record backoff delays instead of sleeping."""
    recorded: list[float] = []
    monkeypatch.setattr(openai_backend, "_sleep", recorded.append)
    return recorded


# -- defaults: the schema's Remote node is their one home --------------------------------------------
def test_the_back_end_takes_every_default_from_the_schema_s_remote_node(tmp_path):
    parameters = inspect.signature(OpenAIChatBackend).parameters
    remote_fields = set(defaults(Remote)) | {"base_url", "model"}
    assert remote_fields <= set(parameters)
    assert [name for name in remote_fields if parameters[name].default is not inspect.Parameter.empty] == []

    node = defaults(Remote)
    assert (node["max_concurrency"], node["timeout_s"], node["include_reasoning"]) == (8, 600, False)  # the schema's
    built = OpenAIChatBackend.from_config(defaults(Remote, base_url="http://127.0.0.1:9/v1", model="m"))
    server = compose_config(["chain_judge=openai"], tmp_path).chain_judge.backend  # the openai option's fields
    composed = OpenAIChatBackend.from_config({k: v for k, v in server.items() if k != "_target_"})
    for backend in (built, composed):
        kept = {name: getattr(backend, name) for name in node if name not in ("base_url", "model")}
        assert {**kept, "server": backend.server.name} == {
            name: value for name, value in node.items() if name not in ("base_url", "model")
        }

    with pytest.raises(ValueError, match=r"unknown keys \['max_concurency'\], missing keys \['timeout_s'\]"):
        OpenAIChatBackend.from_config({**{k: v for k, v in node.items() if k != "timeout_s"}, "max_concurency": 2})
    with pytest.raises(ValueError, match=r"server must be one of \['openai', 'transformers', 'vllm'\], got 'sglang'"):
        remote("http://127.0.0.1:9/v1", "m", server="sglang")
    with pytest.raises(ValueError, match="supports_n=true, but transformers serve"):
        remote("http://127.0.0.1:9/v1", "m", server="transformers", supports_n=True)


# -- generation through transformers serve ------------------------------------------------------------
def test_greedy_replies_through_transformers_serve_equal_the_in_process_ones(
    proxy, tiny_path, tiny_model, tiny_tokenizer
):
    served = remote(proxy.base_url, tiny_path, server="transformers").complete(PROMPTS, GREEDY)
    local = LocalChatBackend(lambda: tiny_model, tiny_tokenizer).complete(PROMPTS, GREEDY)
    assert triples(served) == triples(local)
    assert all(not g.finished and g.num_tokens == 6 for gens in served for g in gens)  # cut at max_tokens: "length"
    # one chat request per prompt, sampling only in palign's own generation_config, no `n`
    bodies = proxy.bodies("/v1/chat/completions")
    assert len(bodies) == 3 and sorted(b["messages"][0]["content"] for b in bodies) == sorted(PROMPTS)
    expected = {
        k: v
        for k, v in generation_config(GREEDY, None, None).to_dict().items()
        if v is not None and k != "transformers_version"
    }
    for body in bodies:
        assert set(body) == {"model", "messages", "seed", "generation_config"}
        assert json.loads(body["generation_config"]) == expected


def test_replies_that_end_their_turn_are_counted_as_in_process(
    proxy, stopping_path, tiny_tokenizer, student_specs, cache_dir
):
    served = remote(proxy.base_url, stopping_path, server="transformers").complete(PROMPTS, GREEDY)
    model = load_model(student_specs["tiny_random"], cache_dir, path=stopping_path)
    local = LocalChatBackend(lambda: model, tiny_tokenizer).complete(PROMPTS, GREEDY)
    # the stop token came from the model's generation_config on both sides, and is not counted
    assert [[(n, finished) for _, n, finished in gens] for gens in triples(served)] == [[(0, True)]] * 3
    assert triples(local) == [[("", 0, True)]] * 3
    # transformers serve decodes the stop token with the reply (skip_special_tokens drops the end-of-turn
    # tokens of real chat models, not this "\n"): the reply text is the stop token's
    stops = json.loads((Path(stopping_path) / "generation_config.json").read_text())["eos_token_id"]
    assert all(gens[0].text in {tiny_tokenizer.decode([t]) for t in stops} for gens in served)


def test_the_server_s_defaults_decide_nothing(proxy, opinionated_path, tiny_tokenizer, student_specs, cache_dir):
    model = load_model(student_specs["tiny_random"], cache_dir, path=opinionated_path)
    local = triples(LocalChatBackend(lambda: model, tiny_tokenizer).complete(PROMPTS, GREEDY))
    assert triples(remote(proxy.base_url, opinionated_path, server="transformers").complete(PROMPTS, GREEDY)) == local
    # the same model's defaults do change the replies where a request leaves them to the server:
    # the OpenAI API's fields (temperature 0) leave its repetition penalty of 1.8 in force
    assert triples(remote(proxy.base_url, opinionated_path, server="openai").complete(PROMPTS, GREEDY)) != local


def test_sampled_completions_one_request_per_sample_are_reproducible_with_the_seed(proxy, tiny_path):
    """Continuation- and evaluation-style prompts, 3 samples each at the authors' settings (T=0.6,
    top-p 0.9, repetition penalty 1.05), on transformers serve, which ignores `n`."""
    texts = [continuation_prompt(PAPER_PROMPTS, QUESTION, PREFIXES[0]), instruction_prompt(PAPER_PROMPTS, QUESTION)]
    sampling = SamplingConfig(max_new_tokens=8, num_samples=3, seed=11)
    backend = remote(proxy.base_url, tiny_path, server="transformers", max_concurrency=4)
    first = triples(backend.complete(texts, sampling))
    bodies = proxy.bodies()
    assert [len(gens) for gens in first] == [3, 3] and all(len(set(gens)) == 3 for gens in first)  # samples differ
    assert len(bodies) == 6 and not any("n" in body for body in bodies)
    for text in texts:
        assert sorted(b["seed"] for b in bodies if b["messages"][0]["content"] == text) == sorted(sample_seeds(11, 3))
    one_sample = {
        k: v
        for k, v in generation_config(SamplingConfig(max_new_tokens=8), None, None).to_dict().items()
        if v is not None and k != "transformers_version"
    }
    assert all(json.loads(body["generation_config"]) == one_sample for body in bodies)
    assert proxy.max_in_flight == 1  # sampled requests one at a time: the server's seed is its process's

    assert triples(backend.complete(texts, sampling)) == first
    assert triples(backend.complete(texts[1:], sampling)) == first[1:]  # a prompt's samples do not depend on its chunk
    other = triples(backend.complete(texts, SamplingConfig(max_new_tokens=8, num_samples=3, seed=12)))
    assert other[0] != first[0] and other[1] != first[1]


def test_a_server_that_ignores_n_is_sent_one_request_per_sample(proxy, tiny_path, caplog):
    sampling = SamplingConfig(max_new_tokens=6, num_samples=3, seed=5)
    # the OpenAI API's shapes on transformers serve: its seed is process-wide, so one request at a time
    trusting = remote(proxy.base_url, tiny_path, server="openai", max_concurrency=1)
    with caplog.at_level(logging.WARNING, logger="palign.llm.openai_backend"):
        outputs = trusting.complete(PROMPTS[:2], sampling)
    assert any("it ignores `n`" in message for message in caplog.messages)
    first, *rest = proxy.bodies()
    assert first["n"] == 3 and len(rest) == 6 and not any("n" in body for body in rest)
    told = remote(proxy.base_url, tiny_path, server="openai", max_concurrency=1, supports_n=False)
    assert triples(outputs) == triples(told.complete(PROMPTS[:2], sampling))
    proxy.reset()
    trusting.complete(PROMPTS[:1], sampling)
    assert len(proxy.bodies()) == 3 and not any("n" in body for body in proxy.bodies())  # never asked again

    insisting = remote(proxy.base_url, tiny_path, server="openai", supports_n=True)
    with pytest.raises(
        ChatBackendError, match=r"asked for n=3 samples, the server returned 1: .* set supports_n: false"
    ):
        insisting.complete(PROMPTS[:1], sampling)


def test_an_interrupted_chunked_run_resumes_without_recomputing(proxy, tiny_path):
    items = [(f"p{i}", instruction_prompt(PAPER_PROMPTS, f"What is {i} + {i}?")) for i in range(5)]
    sampling = SamplingConfig(max_new_tokens=5, num_samples=2, seed=3)
    backend = remote(proxy.base_url, tiny_path, server="transformers", max_retries=0)
    uninterrupted: dict = {}
    complete_missing(
        backend, items, lambda key: False, sampling, lambda chunk: uninterrupted.update(chunk), chunk_size=2
    )
    proxy.reset()

    stored: dict = {}

    def store(chunk) -> None:
        stored.update(chunk)
        if len(stored) == 2:  # the server goes away after the first chunk
            proxy.fail_next = [503] * 10

    with pytest.raises(ChatBackendError, match="HTTP 503"):
        complete_missing(backend, items, stored.__contains__, sampling, store, chunk_size=2)
    assert sorted(stored) == ["p0", "p1"]
    proxy.reset()
    assert complete_missing(backend, items, stored.__contains__, sampling, stored.update, chunk_size=2) == 3
    sent = [body["messages"][0]["content"] for body in proxy.bodies()]
    assert sorted(set(sent)) == sorted(text for key, text in items if key not in ("p0", "p1")) and len(sent) == 6
    assert {key: triples([gens]) for key, gens in stored.items()} == {
        key: triples([gens]) for key, gens in uninterrupted.items()
    }


# -- the judge ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_mode_judge_replies_through_the_server_equal_the_in_process_judge(
    proxy, student_specs, cache_dir, smollm2_tokenizer
):
    """SmolLM2, whose replies are text (the tiny random model only repeats one token)."""
    spec = student_specs["smollm2_135m"]
    path = resolve_model_path(spec, cache_dir)
    settings = dict(mode="generate", max_new_tokens=8, batch_size=2)
    local = SufficiencyJudge.hf(load_model(spec, cache_dir).eval(), smollm2_tokenizer, paper_judge_prompt(), **settings)
    backend = remote(proxy.base_url, path, server="transformers", tokenizer=smollm2_tokenizer)
    served = SufficiencyJudge.on_backend(
        backend, paper_judge_prompt(), engine="batched", context_tokens=local.context_tokens, **settings
    )
    pairs = [(QUESTION, prefix) for prefix in PREFIXES]
    verdicts = served.judge(pairs)
    assert [(v.sufficient, v.reply) for v in verdicts] == [(v.sufficient, v.reply) for v in local.judge(pairs)]
    assert any(v.reply.strip() for v in verdicts)  # replies of words, not empty ones
    assert sorted(body["messages"][0]["content"] for body in proxy.bodies()) == sorted(
        render_prompt(paper_judge_prompt(), q, r) for q, r in pairs
    )


def test_the_logits_mode_is_refused_on_transformers_serve(proxy, tiny_path, tiny_tokenizer):
    backend = remote(proxy.base_url, tiny_path, server="transformers", tokenizer=tiny_tokenizer)
    judge = SufficiencyJudge.on_backend(
        backend,
        paper_judge_prompt(),
        mode="logits",
        max_new_tokens=4,
        batch_size=2,
        engine="batched",
        context_tokens=4096,
    )
    message = r"truncation.judge.mode=logits .* transformers serve \(server: transformers\) .* ignores `logprobs`"
    with pytest.raises(ValueError, match=message + r".*use truncation.judge.mode=generate"):
        backend.check_logits_mode()
    with pytest.raises(ValueError, match=message):
        judge.score([(QUESTION, PREFIXES[0])])
    assert proxy.requests == []  # refused before any request

    # told it is vLLM, the back end sends the forced request, which transformers serve refuses
    misnamed = remote(proxy.base_url, tiny_path, server="vllm", tokenizer=tiny_tokenizer, max_concurrency=1)
    with pytest.raises(
        ChatBackendError,
        match=r"HTTP 422 \(Unexpected fields .*allowed_token_ids.*truncation.judge.mode=logits .* "
        r"is this a vLLM server",
    ):
        misnamed.verdict_scores([judge.encode(QUESTION, PREFIXES[0])], judge.enough_token, judge.not_enough_token)
    assert len(proxy.requests) == 1


@pytest.fixture
def vllm_server(tiny_path):
    server = VLLMCompletionsServer(tiny_path, "tiny", gpu_memory_utilization=0.05)
    yield server
    server.close()


def test_logits_verdict_scores_through_a_vllm_server_equal_the_in_process_judge(
    vllm_server, tiny_model, tiny_tokenizer
):
    settings = dict(mode="logits", max_new_tokens=4, batch_size=4, engine="batched")
    local = SufficiencyJudge.hf(tiny_model, tiny_tokenizer, paper_judge_prompt(), **settings)
    backend = remote(vllm_server.base_url, "tiny", server="vllm", tokenizer=tiny_tokenizer)
    served = SufficiencyJudge.on_backend(backend, paper_judge_prompt(), context_tokens=local.context_tokens, **settings)
    pairs = [(QUESTION, prefix) for prefix in PREFIXES]
    expected, scores = local.score(pairs), served.score(pairs)
    assert max(abs(a - b) for a, b in zip(scores, expected)) < SCORE_TOLERANCE
    assert max(expected) - min(expected) > 100 * SCORE_TOLERANCE  # the prefixes score apart: the comparison can fail
    assert vllm_server.ignored == [set()] * 6  # nothing sent that vLLM would ignore
    # two forced requests per prefix, each a token-id prompt exactly as the in-process judge scores it
    sent = sorted(
        (prompts[0]["prompt_token_ids"], params[0].allowed_token_ids) for prompts, params in vllm_server.llm.calls
    )
    assert sent == sorted(
        (local.encode(q, r), [token]) for q, r in pairs for token in (local.enough_token, local.not_enough_token)
    )


def test_processed_logprobs_are_refused(tiny_path, tiny_tokenizer):
    server = VLLMCompletionsServer(tiny_path, "tiny", gpu_memory_utilization=0.05, logprobs_mode="processed_logprobs")
    try:
        backend = remote(server.base_url, "tiny", server="vllm", tokenizer=tiny_tokenizer)
        with pytest.raises(ChatBackendError, match=r"processed logprobs .* --logprobs-mode raw_logprobs"):
            backend.verdict_scores([encode_user_turn(tiny_tokenizer, "Hi")], 28, 29)
    finally:
        server.close()


# -- vLLM's request shapes --------------------------------------------------------------------------------
def test_vllm_gets_token_prompts_and_every_sampling_field(opinionated_path, tiny_tokenizer, monkeypatch):
    """Against vLLM's completions (the stand-in engine, serving the model with sampling defaults of its
    own): the same samples as palign's in-process vLLM back end on the same engine."""
    server = VLLMCompletionsServer(opinionated_path, "tiny", gpu_memory_utilization=0.05)
    monkeypatch.setitem(sys.modules, "vllm", server.vllm)
    monkeypatch.setattr(vb, "vllm_available", lambda: (True, "the stand-in vLLM"))
    try:
        in_process = vb.VLLMChatBackend(opinionated_path, tiny_tokenizer, gpu_memory_utilization=0.05)
        backend = remote(server.base_url, "tiny", server="vllm", tokenizer=tiny_tokenizer)
        for sampling in (GREEDY, SamplingConfig(max_new_tokens=6, num_samples=3, seed=2, top_k=40)):
            assert triples(backend.complete(PROMPTS, sampling)) == triples(in_process.complete(PROMPTS, sampling))
        assert server.ignored and all(ignored == set() for ignored in server.ignored)
        prompts = sorted(prompts[0]["prompt_token_ids"] for prompts, _ in server.llm.calls)
        assert prompts == sorted(in_process.prompt_token_ids(PROMPTS) * 2)
        sampled = server.llm.calls[-1][1][0]
        assert (sampled.n, sampled.seed, sampled.top_k, sampled.temperature, sampled.repetition_penalty) == (
            3,
            2,
            40,
            0.6,
            1.05,
        )

        per_sample = remote(server.base_url, "tiny", server="vllm", tokenizer=tiny_tokenizer, supports_n=False)
        per_sample.complete(PROMPTS[:1], SamplingConfig(max_new_tokens=4, num_samples=3, seed=2))
        assert [params[0].seed for _, params in server.llm.calls[-3:]] == sample_seeds(2, 3)
    finally:
        vb.release_vllm_engines()
        server.close()


def test_request_fields_the_back_end_sets_cannot_come_from_extra_body(caplog):
    vllm = remote("http://127.0.0.1:9/v1", "m", server="vllm", extra_body={"top_k": 5})
    with pytest.raises(ValueError, match=r"extra_body sets \['top_k'\], which the back end sets itself for vLLM"):
        vllm.complete(PROMPTS[:1], SamplingConfig(top_k=5))
    # the OpenAI API takes no top_k: sent only from extra_body, warned about otherwise
    openai = remote("http://127.0.0.1:9/v1", "m", server="openai")
    assert "top_k" not in openai._payload("Hi", SamplingConfig(top_k=5), n=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="palign.llm.openai_backend"):
        openai.complete([], SamplingConfig(top_k=5, repetition_penalty=1.0))
    assert any("top_k=5 is not an OpenAI API parameter" in m for m in caplog.messages)
    assert (
        remote("http://127.0.0.1:9/v1", "m", extra_body={"top_k": 5})._payload(
            "Hi", SamplingConfig(top_k=5), n=1, seed=0
        )["top_k"]
        == 5
    )
    with pytest.raises(ValueError, match=r"chat_template_kwargs .* cannot be sent to the OpenAI API"):
        remote("http://127.0.0.1:9/v1", "m", chat_template_kwargs={"enable_thinking": False})


# -- keys, retries, concurrency: the proxy in front of the real server -----------------------------------
def test_api_key_is_required_and_never_leaks(proxy, tiny_path, monkeypatch, caplog):
    """transformers serve checks no key; the proxy checks it as OpenAI does."""
    caplog.set_level(logging.DEBUG)
    proxy.api_key = SERVER_KEY
    client = remote(proxy.base_url, tiny_path, server="transformers", api_key_env=KEY_ENV)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ChatBackendError, match=KEY_ENV):
        client.complete(PROMPTS[:1], GREEDY)
    assert proxy.requests == []

    wrong = "sk-wrong-CLIENTSECRET-987654"
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(ChatBackendError) as caught:
        client.complete(PROMPTS[:1], GREEDY)
    error = caught.value
    assert error.status == 401 and "401" in str(error) and "Incorrect API key" in str(error)
    assert len(proxy.requests) == 1  # a 401 is not retried
    full_traceback = "".join(traceback.format_exception(error))
    for text in (
        str(error),
        full_traceback,
        caplog.text,
        repr(client),
        str(vars(client)),
        json.dumps(client.identity()),
    ):
        assert wrong not in text  # the proxy echoed it; the client masks it

    monkeypatch.setenv(KEY_ENV, SERVER_KEY)  # read at call time: the same client now works
    assert len(client.complete(PROMPTS[:1], GREEDY)) == 1
    assert SERVER_KEY not in caplog.text + repr(client) + str(vars(client))


def test_429_and_503_are_retried_with_backoff(proxy, tiny_path, sleeps, caplog):
    proxy.fail_next, proxy.retry_after = [429, 503], "2"
    outputs = remote(proxy.base_url, tiny_path, server="transformers", backoff_s=0.5, max_retries=3).complete(
        PROMPTS[:1], GREEDY
    )
    assert len(outputs) == 1 and len(outputs[0]) == 1 and outputs[0][0].num_tokens == 6
    assert len(proxy.requests) == 3
    assert len(sleeps) == 2 and min(sleeps) >= 2.0  # the server's Retry-After beats the 0.5-1.5 s backoff
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("HTTP 429" in w for w in warnings) and any("HTTP 503" in w for w in warnings)


def test_backoff_doubles_and_retries_run_out(proxy, tiny_path, sleeps):
    proxy.fail_next = [503] * 3
    with pytest.raises(ChatBackendError, match=r"gave up after 3 attempts.*HTTP 503") as caught:
        remote(proxy.base_url, tiny_path, server="transformers", backoff_s=0.1, max_retries=2).complete(
            PROMPTS[:1], GREEDY
        )
    assert caught.value.status == 503 and len(proxy.requests) == 3
    assert 0.1 <= sleeps[0] <= 0.15 and 0.2 <= sleeps[1] <= 0.3


def test_a_request_the_server_refuses_is_not_retried(proxy, tiny_path, sleeps):
    # transformers serve refuses a field outside its parameter types (FastAPI's `detail`)
    refused = remote(proxy.base_url, tiny_path, server="openai", extra_body={"top_k": 5})
    with pytest.raises(
        ChatBackendError, match=r"HTTP 422 \(Unexpected fields in the request: \{'top_k'\}\); not retried"
    ) as caught:
        refused.complete(PROMPTS[:1], GREEDY)
    assert caught.value.status == 422 and len(proxy.requests) == 1 and sleeps == []


def test_connection_errors_are_retried(sleeps):
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = remote(f"http://127.0.0.1:{port}/v1", "tiny", max_retries=2, backoff_s=0.01)
    with pytest.raises(ChatBackendError, match=r"gave up after 3 attempts; last error: connection error"):
        client.complete(PROMPTS[:1], GREEDY)
    assert len(sleeps) == 2


def test_concurrency_limit(proxy, tiny_path):
    proxy.delay_s = 0.3
    outputs = remote(proxy.base_url, tiny_path, server="transformers", max_concurrency=2).complete(PROMPTS * 2, GREEDY)
    assert len(outputs) == 6 and len(proxy.requests) == 6
    assert proxy.max_in_flight == 2  # never more than the limit, and the pool does run requests in parallel
    assert triples(outputs[:3]) == triples(outputs[3:])  # results in input order
