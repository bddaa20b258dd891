"""The vLLM back end: its pure parts on CPU, its plumbing against a stand-in engine, the real thing on a GPU.

vLLM runs only on CUDA machines, so three layers of tests:
- pure functions (the verdict score from logprob dicts, SamplingParams arguments) and the prompt
  tokens, compared with what the Hugging Face `generate` feeds the model;
- the back end and the judge against tests/helpers/vllm_standin.py, a stand-in `vllm` module as strict as
  vLLM 0.33 (each of its rules names the vLLM source it mirrors, and the tests in "the stand-in is
  vLLM 0.33" below check them): real SamplingParams and engine arguments only, the GPU memory an
  engine reserves, the context length, where a reply stops, raw logprobs computed before
  `allowed_token_ids`, on the tiny CPU model;
- the real engine on SmolLM2-135M, skipped with the reason `vllm_available()` gives.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import shutil
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from palign.llm import vllm_backend as vb
from palign.llm.backends import complete_missing
from palign.llm.chat import encode_user_turn
from palign.llm.generation import Generation, SamplingConfig, generate
from palign.schema import JudgePrompt
from palign.truncation.judge import SufficiencyJudge
from palign.truncation.units import split_sentences
from tests.conftest import PROJECT_ROOT
from tests.helpers import vllm_standin
from tests.helpers.vllm_standin import GiB, HFModel, Logprob, Scripted

VLLM_OK, VLLM_REASON = vb.vllm_available()
requires_vllm = pytest.mark.skipif(not VLLM_OK, reason=f"needs vLLM on a CUDA GPU: {VLLM_REASON}")

QUESTION = "Solve x^2 = 9 for positive x."
TRACE = "We have $x^2 = 9$. So $x = 3$ or $x = -3$.\n\nSince x > 0, x = 3. Check: 3.5 is not it. Done!"


def paper_prompt() -> JudgePrompt:
    return JudgePrompt(
        **OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "truncation" / "judge_prompt" / "paper.yaml"))
    )


def vllm_judge(backend: vb.VLLMChatBackend, **settings) -> SufficiencyJudge:
    """The paper-prompt judge on `backend`, with the context its engine admits (as build_judge in
    palign/truncation/stage.py gives it the model's)."""
    return SufficiencyJudge.on_backend(backend, paper_prompt(), context_tokens=backend.context_length(), **settings)


@pytest.fixture
def standin_vllm(monkeypatch):
    """Install the stand-in `vllm` (tests/helpers/vllm_standin.py); returns a function that builds it around a
    model (HFModel: the checkpoint itself; Scripted.factory(replies): scripted replies) and returns it."""

    def install(model=HFModel, **options) -> types.ModuleType:
        module = vllm_standin.module(model, **options)
        monkeypatch.setitem(sys.modules, "vllm", module)
        return module

    monkeypatch.setattr(vb, "vllm_available", lambda: (True, "a stand-in vLLM on CPU"))
    yield install
    vb.release_vllm_engines()


@pytest.fixture(scope="module")
def smollm2_path(student_specs, cache_dir):
    from palign.llm.models import resolve_model_path

    return resolve_model_path(student_specs["smollm2_135m"], cache_dir)


def sent(params, kwargs) -> dict:
    """The values of `kwargs`' keys that a SamplingParams carries."""
    return {key: getattr(params, key) for key in kwargs}


# -- without vLLM -----------------------------------------------------------------------------------
def test_vllm_available_says_why_not():
    usable, reason = vb.vllm_available()
    if importlib.util.find_spec("vllm") is None:
        assert not usable and "pip install 'palign[vllm]' on a CUDA machine" in reason
    elif not torch.cuda.is_available():
        assert not usable and "GPU only" in reason
    else:
        assert usable


def test_missing_vllm_is_a_clear_import_error_at_first_use(monkeypatch, smollm2_tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails, installed or not
    backend = vb.VLLMChatBackend("some/model", smollm2_tokenizer)  # constructing needs no vLLM
    for call in (
        vb.require_vllm,
        lambda: backend.complete(["hi"], SamplingConfig()),
        lambda: backend.verdict_scores([[1, 2, 3]], 4, 5),
    ):
        with pytest.raises(ImportError, match=r"pip install 'palign\[vllm\]' on a CUDA machine"):
            call()
    assert backend.complete([], SamplingConfig()) == []  # nothing to do needs no engine


def test_verdict_score_is_the_full_softmax_log_odds():
    logits = torch.linspace(-3.0, 5.0, 50)[torch.randperm(50, generator=torch.Generator().manual_seed(0))]
    logprobs = torch.log_softmax(logits, -1)
    enough, not_enough = int(logits.argsort()[3]), int(logits.argsort()[10])  # both far outside any top 20
    top = {int(t): Logprob(float(logprobs[t])) for t in logits.argsort(descending=True)[:5]}
    # what a forced request returns: the top-k (here 5) plus the sampled (forced) token
    enough_step = {**top, enough: Logprob(float(logprobs[enough]))}
    not_enough_step = {**top, not_enough: float(logprobs[not_enough])}  # plain floats work too
    score = vb.verdict_score(enough_step, not_enough_step, enough, not_enough)
    assert score == pytest.approx(float(logits[enough] - logits[not_enough]), abs=1e-5)
    with pytest.raises(RuntimeError, match=f"no logprob for the not-enough token {not_enough}"):
        vb.verdict_score(enough_step, top, enough, not_enough)


def test_verdict_score_refuses_processed_logprobs():
    # with one allowed token, a processed mode reports log 1 = 0 for it: P(enough) + P(not) = 2
    with pytest.raises(RuntimeError, match="processed logprobs"):
        vb.verdict_score({7: 0.0}, {9: 0.0}, 7, 9)
    assert vb.verdict_score({7: -1e-9}, {9: -25.0}, 7, 9) == pytest.approx(25.0)  # a confident raw judge is fine
    with pytest.raises(ValueError, match="raw logprobs"):
        vb.VLLMChatBackend(
            "m", types.SimpleNamespace(name_or_path="m"), engine_kwargs={"logprobs_mode": "processed_logprobs"}
        )


def test_sampling_arguments_follow_the_sampling_config():
    assert vb.VLLMChatBackend.sampling_kwargs(SamplingConfig(max_new_tokens=64, num_samples=3, seed=5)) == {
        "n": 3,
        "max_tokens": 64,
        "repetition_penalty": 1.05,
        "seed": 5,
        "detokenize": False,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    greedy = vb.VLLMChatBackend.sampling_kwargs({"do_sample": False, "repetition_penalty": 1.0})
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy
    assert vb.forced_token_request(42) == {
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": 0,
        "allowed_token_ids": [42],
        "detokenize": False,
    }
    # each is a request vLLM 0.33 accepts as it is (the stand-in's SamplingParams runs its checks)
    for kwargs in (
        vb.VLLMChatBackend.sampling_kwargs(SamplingConfig(num_samples=3, top_k=20)),
        greedy,
        vb.forced_token_request(42),
    ):
        assert sent(vllm_standin.SamplingParams(**kwargs), kwargs) == kwargs


def test_prompt_tokens_are_exactly_what_the_hf_path_feeds_the_model(smollm2_tokenizer, tiny_model, monkeypatch):
    texts = ["What is 1 + 1?", "Please continue from the draft.\n*Question*: $x^{2}$ = 4\n*Prefix*: We", "A"]
    seen = []

    def recording_generate(input_ids, attention_mask, **kwargs):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return torch.cat([input_ids, torch.full((len(input_ids), 1), smollm2_tokenizer.eos_token_id)], dim=1)

    monkeypatch.setattr(tiny_model, "generate", recording_generate)
    generate(tiny_model, smollm2_tokenizer, texts, SamplingConfig(do_sample=False, batch_size=8))
    backend = vb.VLLMChatBackend("unused", smollm2_tokenizer)
    assert sorted(backend.prompt_token_ids(texts)) == sorted(seen)  # `generate` batches longest first
    assert backend.prompt_token_ids(texts) == [encode_user_turn(smollm2_tokenizer, t) for t in texts]


def test_vllm_backend_factory_reads_the_model_config_and_engine_settings(student_specs, cache_dir, tiny_path):
    backend = vb.vllm_backend(
        student_specs["tiny_random"], cache_dir, OmegaConf.create({"gpu_memory_utilization": 0.5, "dtype": "float32"})
    )
    assert backend.model_path == tiny_path
    assert backend.engine_args["gpu_memory_utilization"] == 0.5 and backend.engine_args["enable_prefix_caching"] is True
    trained = vb.vllm_backend(student_specs["tiny_random"], cache_dir, {}, weights="/runs/x/student")
    assert trained.model_path == "/runs/x/student" and trained.engine_args["tokenizer"] == tiny_path
    with pytest.raises(ValueError, match=r"unknown keys \['gpu_mem'\]"):
        vb.vllm_backend(student_specs["tiny_random"], cache_dir, {"gpu_mem": 0.5})


# -- against the stand-in engine ------------------------------------------------------------------
def test_complete_keeps_the_chat_backend_contract(standin_vllm, smollm2_tokenizer, tiny_path):
    eos = smollm2_tokenizer.eos_token_id
    answer = smollm2_tokenizer("So x = 3.", add_special_tokens=False)["input_ids"]
    (word,) = smollm2_tokenizer(" word", add_special_tokens=False)["input_ids"]
    sampling = SamplingConfig(max_new_tokens=len(answer) + 1, num_samples=2, seed=3)
    # the first sample ends its turn, the second runs into max_tokens
    vllm = standin_vllm(Scripted.factory([[*answer, eos], [word] * (sampling.max_new_tokens + 1)]))
    backend = vb.VLLMChatBackend(tiny_path, smollm2_tokenizer, dtype="float32")
    stored = []
    done = complete_missing(
        backend, [("a", "First?"), ("b", "Second?"), ("c", "Third?")], lambda key: key == "b", sampling, stored.extend
    )
    assert done == 2 and [key for key, _ in stored] == ["a", "c"]
    for _, generations in stored:
        assert generations[0] == Generation(text="So x = 3.", num_tokens=len(answer), finished=True)
        assert generations[1] == Generation(
            text=" word" * sampling.max_new_tokens, num_tokens=sampling.max_new_tokens, finished=False
        )
    (engine,) = vllm.started
    prompts, params = engine.calls[0]
    assert [p["prompt_token_ids"] for p in prompts] == backend.prompt_token_ids(["First?", "Third?"])
    kwargs = backend.sampling_kwargs(sampling)
    assert sent(params[0], kwargs) == kwargs
    assert engine.engine_args["enable_prefix_caching"] is True and engine.engine_args["model"] == tiny_path


def test_reply_budgets_keep_prompt_and_reply_within_the_context():
    assert vb.reply_budgets([10, 90, 95], max_new_tokens=20, context=100) == ([20, 10, 5], 2)
    assert vb.reply_budgets([10], max_new_tokens=20, context=100) == ([20], 0)
    with pytest.raises(
        ValueError,
        match=r"prompt 1 has 100 tokens, which leaves no room .* context of 100 tokens; raise vllm.max_model_len",
    ):
        vb.reply_budgets([10, 100], max_new_tokens=20, context=100)


def test_complete_caps_replies_that_would_overflow_the_context_and_counts_them(
    standin_vllm, smollm2_tokenizer, tiny_path
):
    vllm = standin_vllm(Scripted.factory([[11] * 16]))
    backend = vb.VLLMChatBackend(tiny_path, smollm2_tokenizer)
    assert backend.context_length() == 4096  # the tiny model's max_position_embeddings (config.json)
    short, long = "Hi?", "word " * 200
    lengths = [len(ids) for ids in backend.prompt_token_ids([short, long])]
    backend.engine_args["max_model_len"] = lengths[1] + 8  # the long prompt leaves 8 tokens
    replies = backend.complete([short, long], SamplingConfig(max_new_tokens=16))
    (engine,) = vllm.started
    _, params = engine.calls[-1]
    assert [p.max_tokens for p in params] == [16, 8] and backend.clamped == 1
    assert [g[0].num_tokens for g in replies] == [16, 8]
    backend.complete([short], SamplingConfig(max_new_tokens=16))  # nothing to cap: one SamplingParams for all
    assert engine.calls[-1][1][0].max_tokens == 16 and backend.clamped == 1


def test_a_prompt_that_leaves_no_room_is_refused_before_the_engine_sees_it(standin_vllm, smollm2_tokenizer, tiny_path):
    vllm = standin_vllm(Scripted.factory([[11] * 16]))
    backend = vb.VLLMChatBackend(tiny_path, smollm2_tokenizer)
    (length,) = [len(ids) for ids in backend.prompt_token_ids(["word " * 50])]
    backend.engine_args["max_model_len"] = length  # vLLM would refuse the whole batch (see the stand-in's test)
    with pytest.raises(ValueError, match=f"prompt 1 has {length} tokens, which leaves no room for a reply"):
        backend.complete(["Hi?", "word " * 50], SamplingConfig(max_new_tokens=16))
    assert not vllm.started or not vllm.started[0].calls


def test_backends_with_the_same_settings_share_one_engine(standin_vllm, smollm2_tokenizer, tiny_path):
    vllm = standin_vllm(Scripted.factory([[11]]))
    one_token = SamplingConfig(max_new_tokens=1)
    judge_side, student_side = (vb.VLLMChatBackend(tiny_path, smollm2_tokenizer) for _ in range(2))
    judge_side.complete(["a"], one_token)
    student_side.complete(["b"], one_token)
    assert len(vllm.started) == 1
    vb.VLLMChatBackend(tiny_path, smollm2_tokenizer, gpu_memory_utilization=0.4).complete(["c"], one_token)
    assert len(vllm.started) == 2 and vllm.started[0].llm_engine.engine_core.shut_down  # one engine at a time
    assert vb.release_vllm_engines() == 1 and vllm.started[1].llm_engine.engine_core.shut_down
    assert vllm.device.free == vllm.device.total
    judge_side.complete(["a"], one_token)
    assert len(vllm.started) == 3  # started again on the next use


def test_a_judge_engine_is_shut_down_before_the_students_engine_starts(
    standin_vllm, smollm2_tokenizer, tiny_path, smollm2_path, caplog
):
    """A judge model other than the student (truncation/judge=smollm2_135m) and the student's
    continuation each want 0.85 of the GPU: vLLM refuses the second while the first is alive."""
    vllm = standin_vllm(Scripted.factory([[11]]), device=vllm_standin.Device(total=80 * GiB))
    one_token = SamplingConfig(max_new_tokens=1)
    judge = vb.VLLMChatBackend(smollm2_path, smollm2_tokenizer)
    student = vb.VLLMChatBackend(tiny_path, smollm2_tokenizer)
    assert judge.engine_args["gpu_memory_utilization"] == student.engine_args["gpu_memory_utilization"] == 0.85
    judge.complete(["Is this enough?"], one_token)
    with caplog.at_level(logging.INFO, logger=vb.__name__):
        assert student.complete(["Continue."], one_token)[0][0].num_tokens == 1
    assert f"vLLM: shutting down the engine of {smollm2_path} to start one for {tiny_path}" in caplog.text
    judge_engine, student_engine = vllm.started
    assert judge_engine.llm_engine.engine_core.shut_down and not student_engine.llm_engine.engine_core.shut_down
    assert list(vllm.device.reservations.values()) == [68 * GiB]
    judge.complete(["Is this enough?"], one_token)  # and back: the judge's engine starts again, the student's goes
    assert len(vllm.started) == 3 and student_engine.llm_engine.engine_core.shut_down


def test_release_shuts_the_engine_core_down_and_training_releases_before_it_starts(
    standin_vllm, smollm2_tokenizer, tiny_path
):
    from palign.training.checkpointing import ReleaseVLLMEngines

    vllm = standin_vllm(Scripted.factory([[11]]))
    backend = vb.VLLMChatBackend(tiny_path, smollm2_tokenizer)
    backend.complete(["a"], SamplingConfig(max_new_tokens=1))
    assert vllm.device.free == 80 * GiB - 68 * GiB
    assert vb.release_vllm_engines() == 1 and vllm.device.free == vllm.device.total
    assert vb.release_vllm_engines() == 0
    backend.complete(["a"], SamplingConfig(max_new_tokens=1))
    ReleaseVLLMEngines().setup(trainer=None, pl_module=None, stage="fit")  # what the training stage runs first
    assert [e.llm_engine.engine_core.shut_down for e in vllm.started] == [True, True]
    assert vllm.device.free == vllm.device.total
    # an engine palign cannot shut down is an error, not GPU memory silently kept
    vb._ENGINES["x"] = types.SimpleNamespace()
    with pytest.raises(RuntimeError, match=r"has no llm_engine.engine_core.shutdown\(\)"):
        vb.release_vllm_engines()


def test_vllm_judge_scores_equal_the_hf_judge(standin_vllm, smollm2_tokenizer, tiny_model, tiny_path):
    vllm = standin_vllm(HFModel)
    prompt = paper_prompt()
    seg = split_sentences(TRACE)
    ks = list(range(1, seg.m + 1))
    hf = SufficiencyJudge.hf(tiny_model, smollm2_tokenizer, prompt, engine="one_pass")
    judge = vllm_judge(
        vb.VLLMChatBackend(tiny_path, smollm2_tokenizer),
        mode="logits",
        max_new_tokens=256,
        batch_size=8,
        engine="one_pass",
    )
    expected, got = hf.prefix_scores([(QUESTION, seg, ks)])[0], judge.prefix_scores([(QUESTION, seg, ks)])[0]
    assert sorted(got) == ks
    for k in ks:
        assert got[k] == pytest.approx(expected[k], abs=1e-4)
    assert len({round(v, 4) for v in got.values()}) > 1
    pairs = [(QUESTION, seg.prefix(k)) for k in (1, seg.m)]
    assert judge.score(pairs) == pytest.approx(hf.score(pairs), abs=1e-4)
    assert judge.calls == len(ks) + len(pairs)
    # every prompt went out twice, each time forcing one verdict token
    prompts, params = vllm.started[0].calls[0]
    assert [p.allowed_token_ids for p in params[:2]] == [[judge.enough_token], [judge.not_enough_token]]
    assert prompts[0] == prompts[1]


def test_processed_logprobs_engine_is_refused(standin_vllm, smollm2_tokenizer, tiny_path):
    standin_vllm(HFModel, default_logprobs_mode="processed_logprobs")  # e.g. a vLLM whose default processes them
    judge = vllm_judge(
        vb.VLLMChatBackend(tiny_path, smollm2_tokenizer),
        mode="logits",
        max_new_tokens=256,
        batch_size=8,
        engine="batched",
    )
    with pytest.raises(RuntimeError, match="processed logprobs"):
        judge.score([(QUESTION, "We have x = 3.")])


def test_generate_mode_judge_parses_vllm_replies(standin_vllm, smollm2_tokenizer, tiny_path):
    vllm = standin_vllm(
        Scripted.factory(
            [smollm2_tokenizer("[ENOUGH]", add_special_tokens=False)["input_ids"] + [smollm2_tokenizer.eos_token_id]]
        )
    )
    judge = vllm_judge(
        vb.VLLMChatBackend(tiny_path, smollm2_tokenizer),
        mode="generate",
        max_new_tokens=32,
        batch_size=8,
        engine="batched",
    )
    verdicts = judge.judge([(QUESTION, "So x = 3.")])
    assert verdicts[0].sufficient and verdicts[0].reply == "[ENOUGH]"
    params = vllm.started[0].calls[0][1][0]
    assert params.temperature == 0.0 and params.max_tokens == 32 and params.repetition_penalty == 1.0


def model_folder(tmp_path, source, generation_config: dict):
    """A model folder with `source`'s config and tokenizer (no weights: for Scripted models) and this
    generation_config.json."""
    folder = tmp_path / "model"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.lock"))
    (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return str(folder)


def test_replies_stop_at_every_eos_of_the_models_generation_config(
    standin_vllm, smollm2_tokenizer, tiny_path, tmp_path
):
    """Qwen2.5's generation_config lists <|im_end|> and <|endoftext|>; the engine stops at either,
    and at the tokenizer's eos whatever the list says (here SmolLM2's ids: <|im_end|> 2, <|endoftext|> 0)."""
    im_end, endoftext = smollm2_tokenizer.eos_token_id, smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (im_end, endoftext) == (2, 0)
    path = model_folder(tmp_path, tiny_path, {"eos_token_id": [im_end, endoftext], "bos_token_id": 1})
    vllm = standin_vllm(Scripted.factory([[11, 12, endoftext, 13], [11, im_end, 13], [11, 12, 13, 14, 15]]))
    sampling = SamplingConfig(max_new_tokens=4, num_samples=3)
    generations = vb.VLLMChatBackend(path, smollm2_tokenizer).complete(["Hi?"], sampling)[0]
    assert [(g.num_tokens, g.finished) for g in generations] == [(2, True), (1, True), (4, False)]
    # what the engine returned: the stop token kept in token_ids, why it stopped
    outputs = (
        vllm.started[0]
        .generate(
            [vllm.TokensPrompt(prompt_token_ids=[5, 6])],
            vllm.SamplingParams(**vb.VLLMChatBackend.sampling_kwargs(sampling)),
        )[0]
        .outputs
    )
    assert [(o.token_ids, o.finish_reason, o.stop_reason) for o in outputs] == [
        ([11, 12, endoftext], "stop", endoftext),
        ([11, im_end], "stop", None),
        ([11, 12, 13, 14], "length", None),
    ]
    # a generation_config without the tokenizer's eos: it still ends the reply
    vb.release_vllm_engines()
    path = model_folder(tmp_path / "other", tiny_path, {"eos_token_id": endoftext})
    assert [
        (g.num_tokens, g.finished) for g in vb.VLLMChatBackend(path, smollm2_tokenizer).complete(["Hi?"], sampling)[0]
    ] == [(2, True), (1, True), (4, False)]


# -- the stand-in is vLLM 0.33 ---------------------------------------------------------------------
REFUSED = [  # vllm/sampling_params.py: SamplingParams._verify_args and _verify_greedy_sampling
    ({"n": 0}, "n must be at least 1, got 0."),
    ({"n": 16385}, "n must be at most 16384, got 16385. To increase this limit, set the VLLM_MAX_N_SEQUENCES"),
    ({"n": 2, "temperature": 0.0}, "n must be 1 when using greedy sampling, got 2."),
    ({"temperature": -0.1}, "temperature must be non-negative, got -0.1. (parameter=temperature, value=-0.1)"),
    ({"temperature": 2.5}, "temperature must be in [0, 2], got 2.5. (parameter=temperature, value=2.5)"),
    ({"temperature": float("inf")}, "temperature must be a finite number, got inf."),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
    ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2."),
    ({"top_k": 1.5}, "top_k must be an integer, got float"),
    ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5."),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero, got 0.0."),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5."),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be less than or equal to max_tokens=4, got 5."),
    ({"logprobs": -2}, "logprobs must be non-negative or -1, got -2."),
    ({"stop": ["x"], "detokenize": False}, "stop strings are only supported when detokenize is True."),
    ({"thinking_token_budget": -5}, "`thinking_token_budget` must be a non-negative integer or -1 for unlimited."),
]


@pytest.mark.parametrize(("kwargs", "message"), REFUSED, ids=[str(k) for k, _ in REFUSED])
def test_the_standin_sampling_params_refuse_what_vllm_refuses(kwargs, message):
    with pytest.raises(vllm_standin.VLLMValidationError) as caught:
        vllm_standin.SamplingParams(**kwargs)
    assert str(caught.value).startswith(message)
    assert not isinstance(caught.value, ValueError)  # vllm/exceptions.py: a VLLMClientError, not a ValueError


def test_the_standin_sampling_params_take_the_real_fields_only_and_normalise_them_as_vllm():
    params = vllm_standin.SamplingParams
    with pytest.raises(TypeError, match="Unexpected keyword argument 'max_new_tokens'"):  # a msgspec Struct
        params(max_new_tokens=5)
    assert params(temperature=2.0).temperature == 2.0 and params(temperature=0.005).temperature == 0.01
    assert params(seed=-1).seed is None  # -1 is "no seed"
    greedy = params(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    request = params(stop_token_ids=[7])
    request.update_from_generation_config({"eos_token_id": [2, 0]}, eos_token_id=2)
    assert request.eos_token_id == 2 and sorted(request.stop_token_ids) == [0, 7]
    assert request.all_stop_token_ids == {0, 2, 7}


def test_the_standin_engine_takes_real_arguments_only_and_reserves_gpu_memory_as_vllm_does(
    tiny_path, smollm2_tokenizer
):
    vllm = vllm_standin.module(Scripted.factory([[11]]), device=vllm_standin.Device(total=80 * GiB))
    with pytest.raises(TypeError, match=r"EngineArgs.__init__\(\) got an unexpected keyword argument 'gpu_mem'"):
        vllm.LLM(tiny_path, gpu_mem=0.5)
    for bad, line in ((0.0, "Input should be greater than 0 "), (1.5, "Input should be less than or equal to 1 ")):
        with pytest.raises(ValueError, match=rf"1 validation error for CacheConfig\ngpu_memory_utilization\n  {line}"):
            vllm.LLM(tiny_path, gpu_memory_utilization=bad)
    with pytest.raises(
        ValueError,
        match=r"User-specified max_model_len \(8192\) is greater than the derived max_model_len "
        r"\(max_position_embeddings=4096",
    ):
        vllm.LLM(tiny_path, max_model_len=8192)
    assert not vllm.started and vllm.device.free == vllm.device.total
    first = vllm.LLM(**vb.VLLMChatBackend(tiny_path, smollm2_tokenizer).engine_args)  # palign's arguments: 0.85
    with pytest.raises(
        RuntimeError,
        match=r"Engine core initialization failed. See root cause above. Failed core "
        r"proc\(s\): \{'EngineCore': 1\}",
    ) as caught:
        vllm.LLM(tiny_path, gpu_memory_utilization=0.85)
    assert str(caught.value.__cause__) == (
        "Free memory on device cuda:0 (12.0/80.0 GiB) on startup is less than desired GPU memory utilization (0.85, "
        "68.0 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes."
    )
    first.llm_engine.engine_core.shutdown()
    first.llm_engine.engine_core.shutdown()  # idempotent
    with pytest.raises(vllm_standin.EngineDeadError):
        first.generate([vllm.TokensPrompt(prompt_token_ids=[5])], vllm.SamplingParams(detokenize=False))
    small = [vllm.LLM(tiny_path, gpu_memory_utilization=0.4) for _ in range(2)]  # two that fit side by side
    assert vllm.device.free == 80 * GiB - 2 * math.ceil(80 * GiB * 0.4)
    assert vllm.started == [first, *small]


def test_the_standin_engine_refuses_a_prompt_that_fills_the_context_and_stops_a_reply_at_it(tiny_path):
    vllm = vllm_standin.module(Scripted.factory([[11] * 16]))
    llm = vllm.LLM(tiny_path, max_model_len=32)
    params = vllm.SamplingParams(max_tokens=16, temperature=0.0, detokenize=False)

    def prompt(length):
        return vllm.TokensPrompt(prompt_token_ids=[5] * length)

    refused = [  # vllm/v1/engine/input_processor.py: _validate_prompt_len; vllm/renderers/params.py: _token_len_check
        (
            32,
            "The decoder prompt (length 32) plus the number of requested output tokens (at least 1) is longer than "
            "the maximum model length of 32. Make sure that `max_model_len` is no smaller than the number of text "
            "tokens (prompt + requested output tokens).",
        ),
        (
            33,
            "This model's maximum context length is 32 tokens. However, your prompt contains at least 33 input "
            "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input "
            "prompt. (parameter=input_tokens, value=33)",
        ),
        (40, "This model's maximum context length is 32 tokens. However, your prompt contains 40 input tokens"),
        (0, "The decoder prompt cannot be empty"),
    ]
    for length, message in refused:
        with pytest.raises(vllm_standin.VLLMValidationError) as caught:  # the whole call fails, short prompts too
            llm.generate([prompt(4), prompt(length)], params)
        assert str(caught.value).startswith(message)
    (out,) = llm.generate([prompt(28)], params)  # 28 + 16 tokens is more than 32: accepted, stopped at the context
    assert (out.outputs[0].token_ids, out.outputs[0].finish_reason) == ([11] * 4, "length")
    checks = [
        ({"allowed_token_ids": [10**6]}, "allowed_token_ids contains out-of-vocab token id!"),
        ({"allowed_token_ids": []}, "allowed_token_ids is not None and empty!"),
        ({"logprobs": 21}, "Requested sample logprobs of 21, which is greater than max allowed: 20"),
    ]
    for kwargs, message in checks:  # vllm/sampling_params.py: SamplingParams.verify, per request
        with pytest.raises(vllm_standin.VLLMValidationError, match=re.escape(message)):
            llm.generate([prompt(4)], vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, **kwargs))
    with pytest.raises(vllm_standin.VLLMValidationError, match=r"The lengths of prompts \(2\) and params \(1\)"):
        llm.generate([prompt(4), prompt(4)], [params])


# -- the real engine (GPU only) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_vllm(student_specs, cache_dir):
    backend = vb.vllm_backend(
        student_specs["smollm2_135m"],
        cache_dir,
        {"gpu_memory_utilization": 0.3, "dtype": "float32", "max_model_len": 4096},
    )
    yield backend
    vb.release_vllm_engines()


@requires_vllm
@pytest.mark.slow
def test_real_vllm_judge_matches_the_hf_judge(smollm2_vllm, smollm2_tokenizer, student_specs, cache_dir):
    from palign.llm.models import load_model

    prompt = paper_prompt()
    seg = split_sentences(TRACE)
    ks = list(range(1, seg.m + 1))
    hf = SufficiencyJudge.hf(
        load_model(student_specs["smollm2_135m"], cache_dir), smollm2_tokenizer, prompt, engine="batched"
    )
    expected = hf.prefix_scores([(QUESTION, seg, ks)])[0]
    got = vllm_judge(smollm2_vllm, mode="logits", max_new_tokens=256, batch_size=8, engine="batched").prefix_scores(
        [(QUESTION, seg, ks)]
    )[0]
    assert max(abs(got[k] - expected[k]) for k in ks) < 2e-2


@requires_vllm
@pytest.mark.slow
def test_real_vllm_samples_and_counts_like_generate(smollm2_vllm, smollm2_tokenizer, student_specs, cache_dir):
    from palign.llm.models import load_model

    texts = ["What is 2 + 3? Answer briefly.", "Name a prime number."]
    sampled = smollm2_vllm.complete(texts, SamplingConfig(max_new_tokens=16, num_samples=3, seed=1))
    for generations in sampled:
        assert len(generations) == 3
        for g in generations:
            assert (g.num_tokens < 16) if g.finished else (g.num_tokens == 16)
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    hf = generate(load_model(student_specs["smollm2_135m"], cache_dir), smollm2_tokenizer, texts, greedy)
    assert [g[0].text for g in smollm2_vllm.complete(texts, greedy)] == [g[0].text for g in hf]


def test_the_vllm_judge_scores_only_the_prefixes_the_search_probes(standin_vllm, smollm2_tokenizer, tmp_path):
    """Configured with the default one_pass engine, the judge on vLLM still asks for the binary
    search's probes only: every prefix would be a request of its own there."""
    from hydra.utils import instantiate

    from palign.teachers.records import TeacherRecord
    from tests.conftest import compose_config, stage_cache

    vllm = standin_vllm(HFModel)
    cfg = compose_config(
        [
            "experiment=tiny",
            "truncation/judge=self",
            "backend@truncation.judge.backend=vllm",
            "truncation.judge.engine=one_pass",
        ],
        tmp_path,
    )
    stage = instantiate(
        cfg.truncation,
        _convert_="object",
        prefix=cfg.baseline.prefix,
        cache_dir=stage_cache(tmp_path),
        tokenizer=smollm2_tokenizer,
    )
    steps = " ".join(f"Step {j}: we add {j} and get {j + 3}." for j in range(1, 17))
    rows = stage.run([TeacherRecord(id="p", question="What is 13 + 3?", answer="16", long_cot=steps)])
    (row,) = rows
    assert row["m"] == 16 and 0 < len(row["probes"]) <= 5  # binary search over 16 prefixes
    assert row["prefixes_scored"] == len(row["probes"])
    (engine,) = vllm.started
    assert sum(len(prompts) for prompts, _ in engine.calls) == 2 * len(row["probes"])  # two forced requests per probe


def test_paper_recipes_pick_vllm_where_it_runs_and_say_so_where_it_does_not(tmp_path, caplog, monkeypatch):
    from hydra.utils import instantiate

    from palign.llm.hf_backend import HFBackend
    from tests.conftest import compose_config

    for recipe in ("paper/table1_qwen2_5_7b", "paper/table1_qwen3_8b"):
        cfg = compose_config([f"experiment={recipe}"], tmp_path, hydra=True)
        for key in ("truncation.judge.backend", "alignment.backend", "evaluation.backend"):
            assert cfg.hydra.runtime.choices[f"backend@{key}"] == "auto"
    auto = instantiate(cfg.alignment.backend)
    monkeypatch.setattr(vb, "vllm_available", lambda: (False, "vLLM is not installed"))
    with caplog.at_level("WARNING"):
        assert isinstance(auto.resolve("alignment.backend"), HFBackend)
    assert "alignment.backend=auto: using HFBackend(), not VLLMBackend() (vLLM is not installed)" in caplog.text
    monkeypatch.setattr(vb, "vllm_available", lambda: (True, "a GPU"))
    chosen = auto.resolve("alignment.backend")
    assert (
        isinstance(chosen, vb.VLLMBackend)
        and chosen.engine["gpu_memory_utilization"] == cfg.vllm.gpu_memory_utilization
    )
    assert isinstance(HFBackend().resolve("alignment.backend"), HFBackend)  # an explicit choice stands


def test_a_trace_longer_than_the_engines_context_is_searched_without_a_refused_request(
    standin_vllm, smollm2_tokenizer, tmp_path
):
    """vLLM fails a whole generate() call when one prompt fills max_model_len (the stand-in does as
    vllm/v1/engine/input_processor.py does): the judge sends only the probes that fit the context it
    shares with the engine, and counts the others as not sufficient."""
    from hydra.utils import instantiate

    from palign.teachers.records import TeacherRecord
    from tests.conftest import compose_config, stage_cache

    vllm = standin_vllm(HFModel)
    steps = " ".join(f"Step {j}: we add {j} and get {j + 3}." for j in range(1, 41))
    records = [
        TeacherRecord(id="short", question="What is 1 + 3?", answer="4", long_cot="Step 1: 1 + 3 = 4. Done."),
        TeacherRecord(id="long", question="What is 40 + 3?", answer="43", long_cot=steps),
    ]

    def stage(*overrides):
        cfg = compose_config(
            [
                "experiment=tiny",
                "truncation/judge=self",
                "backend@truncation.judge.backend=vllm",
                "truncation.judge.engine=batched",
                *overrides,
            ],
            tmp_path,
        )
        return instantiate(
            cfg.truncation,
            _convert_="object",
            prefix=cfg.baseline.prefix,
            cache_dir=stage_cache(tmp_path),
            tokenizer=smollm2_tokenizer,
        )

    # an engine shorter than the judge's context would refuse the longest probes: refused before it starts
    with pytest.raises(
        ValueError,
        match=r"the judge's engine admits 256 tokens \(vllm.max_model_len, else the model's\), "
        r"below the judge's context of 4096 tokens .* set "
        r"truncation.judge.max_context_tokens=256",
    ):
        stage("vllm.max_model_len=256").run(records)
    assert not vllm.started
    rows = {
        row["id"]: row
        for row in stage("vllm.max_model_len=256", "truncation.judge.max_context_tokens=256").run(records)
    }
    long = rows["long"]
    assert set(rows) == {"short", "long"} and 0 < long["fitting_k"] < long["m"]
    assert long["probes"][0]["over_context"] and long["probes_over_context"] >= 1  # half the trace does not fit
    (engine,) = vllm.started
    sent_lengths = [len(prompt["prompt_token_ids"]) for prompts, _ in engine.calls for prompt in prompts]
    assert sent_lengths and max(sent_lengths) < 256  # every request left room for its verdict token
