"""The vLLM back end: its pure parts on CPU, its plumbing against a stand-in engine, the real thing on a GPU.

vLLM runs only on CUDA machines, so three layers of tests:
- pure functions (the verdict score from logprob dicts, SamplingParams arguments) and the prompt
  tokens, compared with what the Hugging Face `generate` feeds the model;
- the back end and the judge against `FakeVLLM`, a stand-in `vllm` module that follows vLLM V1's
  documented semantics (raw logprobs computed before `allowed_token_ids`, the sampled token's
  logprob always returned, end-of-turn tokens kept in `token_ids`) on the tiny CPU model;
- the real engine on SmolLM2-135M, skipped with the reason `vllm_available()` gives.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from conftest import PROJECT_ROOT
from palign.llm import vllm_backend as vb
from palign.llm.chat import encode_user_turn
from palign.llm.generation import Generation, SamplingConfig, generate
from palign.llm.openai_backend import complete_missing
from palign.truncation.judge import JudgePrompt, SufficiencyJudge
from palign.truncation.units import segment

VLLM_OK, VLLM_REASON = vb.vllm_available()
requires_vllm = pytest.mark.skipif(not VLLM_OK, reason=f"needs vLLM on a CUDA GPU: {VLLM_REASON}")

QUESTION = "Solve x^2 = 9 for positive x."
TRACE = "We have $x^2 = 9$. So $x = 3$ or $x = -3$.\n\nSince x > 0, x = 3. Check: 3.5 is not it. Done!"


def paper_prompt() -> JudgePrompt:
    return JudgePrompt.from_config(OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "truncation" / "judge_prompt" / "paper.yaml")))


# -- a stand-in for the `vllm` module ---------------------------------------------------------------
@dataclass
class Logprob:
    logprob: float


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str
    stop_reason: Any = None
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutput:
    outputs: list[Completion]


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.n = kwargs.get("n", 1)


@dataclass
class FakeEngine:
    """Records what it was started with and asked; subclasses answer."""

    engine_args: dict[str, Any]
    calls: list[tuple[list[dict], list[SamplingParams]]] = field(default_factory=list)

    def __post_init__(self):
        pass

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        self.calls.append((prompts, params))
        return [RequestOutput(self.answer(prompt["prompt_token_ids"], p)) for prompt, p in zip(prompts, params)]


class RawLogprobsEngine(FakeEngine):
    """vLLM V1's sampler on the Hugging Face model: logprobs from the raw logits, then the whitelist."""

    processed = False

    def __post_init__(self):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.engine_args["model"], dtype=torch.float32).eval()

    def answer(self, ids, params):
        kwargs = params.kwargs
        assert kwargs["max_tokens"] == 1 and kwargs["logprobs"] == 0 and kwargs["temperature"] == 0.0
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0, -1].float()
        allowed = torch.tensor(kwargs["allowed_token_ids"])
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        token = int(masked.argmax())
        source = masked if self.processed else logits
        return [Completion([token], "length", None, [{token: Logprob(float(torch.log_softmax(source, -1)[token]))}])]


class ProcessedLogprobsEngine(RawLogprobsEngine):
    processed = True


class ScriptedEngine(FakeEngine):
    """Answers every request with `replies` (token ids, finish reason), cycling over the n samples."""

    replies: list[tuple[list[int], str]] = []

    def answer(self, ids, params):
        return [Completion(list(tokens), reason) for tokens, reason in self.replies[: params.n]]


@pytest.fixture
def fake_vllm(monkeypatch):
    """Install a stand-in `vllm` module; returns a function that picks the engine class."""
    module = types.ModuleType("vllm")
    module.SamplingParams = SamplingParams
    module.TokensPrompt = lambda **kwargs: dict(kwargs)  # a TypedDict: a plain dict at run time
    started: list[FakeEngine] = []

    def use(engine_class):
        module.LLM = lambda **kwargs: started.append(engine_class(kwargs)) or started[-1]
        return started

    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vb, "vllm_available", lambda: (True, "a stand-in vLLM on CPU"))
    yield use
    vb.release_vllm_engines()


@pytest.fixture(scope="module")
def tiny_path(student_specs, cache_dir):
    from palign.llm.models import resolve_model_path

    return resolve_model_path(student_specs["tiny_random"], cache_dir)


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
    for call in (vb.require_vllm, lambda: backend.complete(["hi"], SamplingConfig()),
                 lambda: backend.verdict_scores([[1, 2, 3]], 4, 5)):
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
        vb.VLLMChatBackend("m", types.SimpleNamespace(name_or_path="m"), engine_kwargs={"logprobs_mode": "processed_logprobs"})


def test_sampling_arguments_follow_the_sampling_config():
    assert vb.VLLMChatBackend.sampling_kwargs(SamplingConfig(max_new_tokens=64, num_samples=3, seed=5)) == {
        "n": 3, "max_tokens": 64, "repetition_penalty": 1.05, "seed": 5, "detokenize": False,
        "temperature": 0.6, "top_p": 0.9,
    }
    greedy = vb.VLLMChatBackend.sampling_kwargs({"do_sample": False, "repetition_penalty": 1.0})
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy
    assert vb.forced_token_request(42) == {"max_tokens": 1, "temperature": 0.0, "logprobs": 0,
                                           "allowed_token_ids": [42], "detokenize": False}


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
    backend = vb.vllm_backend(student_specs["tiny_random"], cache_dir, OmegaConf.create({"gpu_memory_utilization": 0.5, "dtype": "float32"}))
    assert backend.model_path == tiny_path
    assert backend.engine_args["gpu_memory_utilization"] == 0.5 and backend.engine_args["enable_prefix_caching"] is True
    trained = vb.vllm_backend(student_specs["tiny_random"], cache_dir, {}, weights="/runs/x/student")
    assert trained.model_path == "/runs/x/student" and trained.engine_args["tokenizer"] == tiny_path
    with pytest.raises(ValueError, match=r"unknown keys \['gpu_mem'\]"):
        vb.vllm_backend(student_specs["tiny_random"], cache_dir, {"gpu_mem": 0.5})


# -- against the stand-in engine ------------------------------------------------------------------
def test_complete_keeps_the_chat_backend_contract(fake_vllm, smollm2_tokenizer, tiny_path):
    started = fake_vllm(ScriptedEngine)
    eos = smollm2_tokenizer.eos_token_id
    answer = smollm2_tokenizer("So x = 3.", add_special_tokens=False)["input_ids"]
    ScriptedEngine.replies = [(answer + [eos], "stop"), ([11, 12, 13, 14], "length")]
    backend = vb.VLLMChatBackend(tiny_path, smollm2_tokenizer, dtype="float32")
    stored = []
    done = complete_missing(backend, [("a", "First?"), ("b", "Second?"), ("c", "Third?")], lambda key: key == "b",
                            SamplingConfig(max_new_tokens=4, num_samples=2, seed=3), stored.extend)
    assert done == 2 and [key for key, _ in stored] == ["a", "c"]
    for _, generations in stored:
        assert generations[0] == Generation(text="So x = 3.", num_tokens=len(answer), finished=True)
        assert generations[1] == Generation(text=smollm2_tokenizer.decode([11, 12, 13, 14], skip_special_tokens=True),
                                            num_tokens=4, finished=False)
    (engine,) = started
    prompts, params = engine.calls[0]
    assert [p["prompt_token_ids"] for p in prompts] == backend.prompt_token_ids(["First?", "Third?"])
    assert params[0].kwargs == backend.sampling_kwargs(SamplingConfig(max_new_tokens=4, num_samples=2, seed=3))
    assert engine.engine_args["enable_prefix_caching"] is True and engine.engine_args["model"] == tiny_path


def test_reply_budgets_keep_prompt_and_reply_within_the_context():
    assert vb.reply_budgets([10, 90, 95], max_new_tokens=20, context=100) == ([20, 10, 5], 2)
    assert vb.reply_budgets([10], max_new_tokens=20, context=100) == ([20], 0)
    with pytest.raises(ValueError, match=r"prompt 1 has 100 tokens, which leaves no room .* context of 100 tokens; raise vllm.max_model_len"):
        vb.reply_budgets([10, 100], max_new_tokens=20, context=100)


def test_complete_caps_replies_that_would_overflow_the_context_and_counts_them(fake_vllm, smollm2_tokenizer, tiny_path):
    started = fake_vllm(ScriptedEngine)
    ScriptedEngine.replies = [([1], "length")]
    backend = vb.VLLMChatBackend(tiny_path, smollm2_tokenizer)
    assert backend.context_length() == 4096  # the tiny model's max_position_embeddings (config.json)
    short, long = "Hi?", "word " * 200
    lengths = [len(ids) for ids in backend.prompt_token_ids([short, long])]
    backend.engine_args["max_model_len"] = lengths[1] + 8  # the long prompt leaves 8 tokens
    backend.complete([short, long], SamplingConfig(max_new_tokens=16))
    (engine,) = started
    _, params = engine.calls[-1]
    assert [p.kwargs["max_tokens"] for p in params] == [16, 8] and backend.clamped == 1
    backend.complete([short], SamplingConfig(max_new_tokens=16))  # nothing to cap: one SamplingParams for all
    assert engine.calls[-1][1][0].kwargs["max_tokens"] == 16 and backend.clamped == 1


def test_backends_with_the_same_settings_share_one_engine(fake_vllm, smollm2_tokenizer, tiny_path):
    started = fake_vllm(ScriptedEngine)
    ScriptedEngine.replies = [([1], "length")]
    judge_side, student_side = (vb.VLLMChatBackend(tiny_path, smollm2_tokenizer) for _ in range(2))
    judge_side.complete(["a"], SamplingConfig())
    student_side.complete(["b"], SamplingConfig())
    assert len(started) == 1
    vb.VLLMChatBackend(tiny_path, smollm2_tokenizer, gpu_memory_utilization=0.4).complete(["c"], SamplingConfig())
    assert len(started) == 2
    assert vb.release_vllm_engines() == 2
    judge_side.complete(["a"], SamplingConfig())
    assert len(started) == 3  # started again on the next use


def test_vllm_judge_scores_equal_the_hf_judge(fake_vllm, smollm2_tokenizer, tiny_model, tiny_path):
    started = fake_vllm(RawLogprobsEngine)
    prompt = paper_prompt()
    seg = segment(TRACE, "sentence")
    ks = list(range(1, seg.m + 1))
    hf = SufficiencyJudge.hf(tiny_model, smollm2_tokenizer, prompt, engine="one_pass")
    judge = SufficiencyJudge.on_backend(vb.VLLMChatBackend(tiny_path, smollm2_tokenizer), prompt, mode="logits", max_new_tokens=256, batch_size=8, engine="one_pass")
    expected, got = hf.prefix_scores([(QUESTION, seg, ks)])[0], judge.prefix_scores([(QUESTION, seg, ks)])[0]
    assert sorted(got) == ks
    for k in ks:
        assert got[k] == pytest.approx(expected[k], abs=1e-4)
    assert len({round(v, 4) for v in got.values()}) > 1
    pairs = [(QUESTION, seg.prefix(k)) for k in (1, seg.m)]
    assert judge.score(pairs) == pytest.approx(hf.score(pairs), abs=1e-4)
    assert judge.calls == len(ks) + len(pairs)
    # every prompt went out twice, each time forcing one verdict token
    prompts, params = started[0].calls[0]
    assert [p.kwargs["allowed_token_ids"] for p in params[:2]] == [[judge.enough_token], [judge.not_enough_token]]
    assert prompts[0] == prompts[1]


def test_processed_logprobs_engine_is_refused(fake_vllm, smollm2_tokenizer, tiny_path):
    fake_vllm(ProcessedLogprobsEngine)
    judge = SufficiencyJudge.on_backend(vb.VLLMChatBackend(tiny_path, smollm2_tokenizer), paper_prompt(), mode="logits", max_new_tokens=256, batch_size=8, engine="batched")
    with pytest.raises(RuntimeError, match="processed logprobs"):
        judge.score([(QUESTION, "We have x = 3.")])


def test_generate_mode_judge_parses_vllm_replies(fake_vllm, smollm2_tokenizer, tiny_path):
    started = fake_vllm(ScriptedEngine)
    ScriptedEngine.replies = [(smollm2_tokenizer("[ENOUGH]", add_special_tokens=False)["input_ids"] + [smollm2_tokenizer.eos_token_id], "stop")]
    judge = SufficiencyJudge.on_backend(vb.VLLMChatBackend(tiny_path, smollm2_tokenizer), paper_prompt(), mode="generate", max_new_tokens=32,
                                        batch_size=8, engine="batched")
    verdicts = judge.judge([(QUESTION, "So x = 3.")])
    assert verdicts[0].sufficient and verdicts[0].reply == "[ENOUGH]"
    kwargs = started[0].calls[0][1][0].kwargs
    assert kwargs["temperature"] == 0.0 and kwargs["max_tokens"] == 32 and kwargs["repetition_penalty"] == 1.0


# -- the real engine (GPU only) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_vllm(student_specs, cache_dir):
    backend = vb.vllm_backend(student_specs["smollm2_135m"], cache_dir,
                              {"gpu_memory_utilization": 0.3, "dtype": "float32", "max_model_len": 4096})
    yield backend
    vb.release_vllm_engines()


@requires_vllm
@pytest.mark.slow
def test_real_vllm_judge_matches_the_hf_judge(smollm2_vllm, smollm2_tokenizer, student_specs, cache_dir):
    from palign.llm.models import load_model

    prompt = paper_prompt()
    seg = segment(TRACE, "sentence")
    ks = list(range(1, seg.m + 1))
    hf = SufficiencyJudge.hf(load_model(student_specs["smollm2_135m"], cache_dir), smollm2_tokenizer, prompt, engine="batched")
    expected = hf.prefix_scores([(QUESTION, seg, ks)])[0]
    got = SufficiencyJudge.on_backend(smollm2_vllm, prompt, mode="logits", max_new_tokens=256, batch_size=8, engine="batched").prefix_scores([(QUESTION, seg, ks)])[0]
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


def test_the_vllm_judge_scores_only_the_prefixes_the_search_probes(fake_vllm, smollm2_tokenizer, tmp_path):
    """Configured with the default one_pass engine, the judge on vLLM still asks for the binary
    search's probes only: every prefix would be a request of its own there."""
    from hydra.utils import instantiate

    from conftest import compose_config, stage_cache
    from palign.teachers.records import TeacherRecord

    started = fake_vllm(RawLogprobsEngine)
    cfg = compose_config(["experiment=tiny", "truncation/judge=self", "truncation.judge.backend=vllm",
                          "truncation.judge.engine=one_pass"], tmp_path)
    stage = instantiate(cfg.truncation, _convert_="all", baseline=OmegaConf.to_container(cfg.baseline, resolve=True),
                        cache_dir=stage_cache(tmp_path), tokenizer=smollm2_tokenizer,
                        vllm=OmegaConf.to_container(cfg.vllm, resolve=True))
    steps = " ".join(f"Step {j}: we add {j} and get {j + 3}." for j in range(1, 17))
    rows = stage.run([TeacherRecord(id="p", question="What is 13 + 3?", answer="16", long_cot=steps)])
    (row,) = rows
    assert row["m"] == 16 and 0 < len(row["probes"]) <= 5  # binary search over 16 prefixes
    assert row["prefixes_scored"] == len(row["probes"])
    (engine,) = started
    assert sum(len(prompts) for prompts, _ in engine.calls) == 2 * len(row["probes"])  # two forced requests per probe


def test_paper_recipes_pick_vllm_where_it_runs_and_say_so_where_it_does_not(tmp_path, caplog, monkeypatch):
    from conftest import compose_config

    for recipe in ("paper/table1_qwen2_5_7b", "paper/table1_qwen3_8b"):
        cfg = compose_config([f"experiment={recipe}"], tmp_path)
        assert cfg.truncation.judge.backend == cfg.alignment.backend == cfg.evaluation.backend == "auto"
    monkeypatch.setattr(vb, "vllm_available", lambda: (False, "vLLM is not installed"))
    with caplog.at_level("WARNING"):
        assert vb.resolve_backend("auto", "alignment.backend") == "hf"
    assert "alignment.backend=auto: using the Hugging Face back end, not vLLM (vLLM is not installed)" in caplog.text
    monkeypatch.setattr(vb, "vllm_available", lambda: (True, "a GPU"))
    assert vb.resolve_backend("auto", "alignment.backend") == "vllm"
    assert vb.resolve_backend("hf", "alignment.backend") == "hf"  # an explicit choice stands
