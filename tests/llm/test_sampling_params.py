"""Every back end samples with exactly the configured parameters, whatever the model's generation_config says.

transformers completes a generation request from the model's generation_config.json (Qwen2.5 and
Qwen3 ship top_k 20, a repetition penalty, ...) and its own defaults (top_k 50); vLLM, which the
authors sampled with, applies only what a request carries. These tests give the tiny model a saved
generation_config.json full of such settings and check that palign's decoding ignores all of them.
The one setting both back ends take from it is where a reply ends (its eos ids), and there the
Hugging Face path stops where vLLM stops. The sampling settings themselves are held to vLLM 0.33's
limits (tests/helpers/vllm_standin.py mirrors its SamplingParams) when a config is checked.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from palign.llm.generation import Generation, SamplingConfig, generate, generation_config
from palign.llm.openai_backend import OpenAIChatBackend
from palign.llm.vllm_backend import VLLMChatBackend
from palign.schema import ConfigError, Remote, check_values, defaults
from tests.conftest import compose_config
from tests.helpers import vllm_standin

# what a model could ship in generation_config.json; each one would change the sampled tokens
MODEL_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 20,
    "top_p": 0.5,
    "min_p": 0.2,
    "typical_p": 0.5,
    "repetition_penalty": 1.5,
    "no_repeat_ngram_size": 2,
    "epsilon_cutoff": 0.01,
}
PROMPTS = ["What is 2 + 3?", "Name a prime number larger than 10."]


@pytest.fixture()
def opinionated_model(tiny_model, tmp_path):
    """The tiny model saved with MODEL_DEFAULTS in its generation_config.json, and loaded back."""
    folder = tmp_path / "opinionated"
    tiny_model.save_pretrained(folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **MODEL_DEFAULTS}))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.top_k == 20 and model.generation_config.min_p == 0.2
    return model


def processed_scores(model, tokenizer, sampling: SamplingConfig):
    """(raw logits, processed scores) of each generated step, from transformers' own generate."""
    config = generation_config(sampling, tokenizer.pad_token_id, tokenizer.eos_token_id)
    config.update(output_scores=True, output_logits=True, return_dict_in_generate=True)
    ids = torch.tensor([tokenizer("Compute 1 + 1.", add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return torch.stack(out.logits), torch.stack(out.scores)


def test_no_setting_of_the_models_generation_config_reaches_sampling(opinionated_model, smollm2_tokenizer):
    neutral = SamplingConfig(max_new_tokens=4, temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    logits, scores = processed_scores(opinionated_model, smollm2_tokenizer, neutral)
    # nothing filtered, penalised or rescaled: the model's top_k 20, min_p, typical_p, temperature,
    # repetition penalty and n-gram ban would each change these
    assert torch.equal(scores, logits)
    logits, scores = processed_scores(
        opinionated_model,
        smollm2_tokenizer,
        SamplingConfig(max_new_tokens=4, temperature=0.5, top_p=1.0, repetition_penalty=1.0),
    )
    assert torch.allclose(scores, logits / 0.5)  # the configured temperature is applied, and only it


def test_a_configured_top_k_keeps_exactly_k_tokens(opinionated_model, smollm2_tokenizer):
    _, scores = processed_scores(
        opinionated_model, smollm2_tokenizer, SamplingConfig(max_new_tokens=4, top_p=1.0, top_k=5)
    )
    assert (torch.isfinite(scores).sum(-1) == 5).all()
    # off (null or 0): the configured top-p alone decides; the tiny model's near-uniform
    # distribution keeps far more than the model's 20 or transformers' default 50 tokens
    for off in (None, 0):
        _, scores = processed_scores(opinionated_model, smollm2_tokenizer, SamplingConfig(max_new_tokens=4, top_k=off))
        assert (torch.isfinite(scores).sum(-1) > 1000).all()


def test_generate_samples_alike_whatever_the_model_ships(opinionated_model, tiny_model, smollm2_tokenizer, caplog):
    sampling = SamplingConfig(max_new_tokens=6, num_samples=2, seed=3, batch_size=2)
    greedy = SamplingConfig(max_new_tokens=6, do_sample=False, repetition_penalty=1.0)
    with caplog.at_level(logging.WARNING):
        shipped = generate(opinionated_model, smollm2_tokenizer, PROMPTS, sampling)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("transformers")]  # a consistent config
    # (greedy decoding leaves the warpers to the model, which transformers warns about and never applies)
    shipped_greedy = generate(opinionated_model, smollm2_tokenizer, PROMPTS, greedy)
    # the same weights with a plain generation_config give the same samples
    assert generate(tiny_model, smollm2_tokenizer, PROMPTS, sampling) == shipped
    assert generate(tiny_model, smollm2_tokenizer, PROMPTS, greedy) == shipped_greedy


def test_top_k_is_validated_and_reaches_vllm_only_when_set():
    with pytest.raises(ValueError, match=r"sampling.top_k must be null, 0 \(off\) or an integer >= 1, got -1"):
        SamplingConfig(top_k=-1)
    with pytest.raises(ValueError, match=r"unknown keys \['min_p'\]"):
        SamplingConfig.from_config({"min_p": 0.1})
    # vLLM's SamplingParams default is top-k off (and no min_p, no penalties): omitting it is "off"
    for off in (None, 0):
        assert "top_k" not in VLLMChatBackend.sampling_kwargs(SamplingConfig(top_k=off))
    assert VLLMChatBackend.sampling_kwargs(SamplingConfig(top_k=5))["top_k"] == 5
    assert "top_k" not in VLLMChatBackend.sampling_kwargs(SamplingConfig(do_sample=False, top_k=5))  # greedy


def test_openai_requests_carry_top_k_only_where_the_server_is_told_to(caplog):
    backend = OpenAIChatBackend.from_config(
        defaults(Remote, base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None)
    )
    payload = backend._payload("Hi", SamplingConfig(top_k=5, repetition_penalty=1.0), n=1, seed=0)
    assert "top_k" not in payload  # not an OpenAI parameter: OpenAI itself rejects it
    with caplog.at_level(logging.WARNING, logger="palign.llm.openai_backend"):
        backend.complete([], SamplingConfig(top_k=5, repetition_penalty=1.0))
    assert any("top_k=5 is not an OpenAI API parameter" in m for m in caplog.messages)
    vllm_server = OpenAIChatBackend.from_config(
        defaults(Remote, base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None, extra_body={"top_k": 5})
    )
    assert vllm_server._payload("Hi", SamplingConfig(top_k=5), n=1, seed=0)["top_k"] == 5


# -- where a reply ends ------------------------------------------------------------------------------
def forcing(model, schedule: list[int]) -> None:
    """Make `model` (a copy) emit `schedule[i]` as its i-th new token (the last one from then on)
    whatever it is asked: a hook on its lm_head lifts that token's logit far above the others. The
    prompt's forward (more than one input position) starts a new generation."""
    steps: list[int] = []

    def start(module, inputs):
        if inputs[0].shape[1] > 1:
            steps.clear()

    def lift(module, inputs, logits):
        token = schedule[min(len(steps), len(schedule) - 1)]
        steps.append(token)
        logits = logits.clone()
        logits[:, -1, token] += 1e4
        return logits

    model.get_input_embeddings().register_forward_pre_hook(start)
    model.lm_head.register_forward_hook(lift)


def test_generate_stops_at_every_eos_of_the_models_generation_config_as_vllm_does(tiny_model, smollm2_tokenizer):
    """Qwen2.5's generation_config lists two eos ids (<|im_end|>, <|endoftext|>) and vLLM stops at
    either (tests/llm/test_vllm_backend.py checks the stand-in engine does): so must `generate`, not only
    at the tokenizer's eos. Here the SmolLM2 ids: <|im_end|> 2 (the tokenizer's eos), <|endoftext|> 0."""
    im_end, endoftext = smollm2_tokenizer.eos_token_id, smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (im_end, endoftext) == (2, 0)
    (word,) = smollm2_tokenizer(" word", add_special_tokens=False)["input_ids"]
    model = copy.deepcopy(tiny_model)
    model.generation_config.eos_token_id = [im_end, endoftext]
    forcing(model, [word, word, endoftext])
    for sampling in (
        SamplingConfig(max_new_tokens=6, do_sample=False, batch_size=2),
        SamplingConfig(max_new_tokens=6, num_samples=2, seed=1, batch_size=2),
    ):
        replies = generate(model, smollm2_tokenizer, [*PROMPTS, "A third, longer question: what is 7 * 6?"], sampling)
        # the stop token ends the reply and is not counted, as vLLM's token_ids minus its stop token
        assert replies == [[Generation(text=" word word", num_tokens=2, finished=True)] * sampling.num_samples] * 3
    # a list without the tokenizer's eos: the tokenizer's eos still ends the reply (vLLM stops at both),
    # and a token of neither lets the reply run to max_new_tokens
    greedy = SamplingConfig(max_new_tokens=6, do_sample=False)
    for schedule, reply in (
        ([word, im_end], Generation(text=" word", num_tokens=1, finished=True)),
        ([word], Generation(text=" word" * 6, num_tokens=6, finished=False)),
    ):
        model = copy.deepcopy(tiny_model)
        model.generation_config.eos_token_id = endoftext
        forcing(model, schedule)
        assert generate(model, smollm2_tokenizer, PROMPTS[:1], greedy) == [[reply]]


# -- vLLM's limits, checked with the config ----------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("alignment.sampling.temperature=2.5", "alignment.sampling.temperature=2.5: must be a number in [0.01, 2]"),
        ("evaluation.sampling.temperature=0", "evaluation.sampling.temperature=0.0: must be a number in [0.01, 2]"),
        (
            "evaluation.sampling.temperature=0.005",
            "evaluation.sampling.temperature=0.005: must be a number in [0.01, 2]",
        ),
        (
            "evaluation.sampling.num_samples=16385",
            "evaluation.sampling.num_samples=16385: must be an integer >= 1 and <= 16384",
        ),
        ("alignment.sampling.seed=-1", "alignment.sampling.seed=-1: must be an integer >= 0"),
        # two fields together: vLLM refuses greedy decoding with several samples
        (
            "evaluation.sampling.do_sample=false",
            "evaluation.sampling.num_samples=3: must be 1 when evaluation.sampling.do_sample=false",
        ),
    ],
)
def test_the_schema_refuses_the_sampling_values_vllm_refuses_or_changes(override, message, tmp_path):
    cfg = compose_config([override], tmp_path)
    with pytest.raises(ConfigError) as caught:
        check_values(cfg)
    assert message in str(caught.value)


def test_what_the_schema_accepts_vllm_takes_as_it_is():
    """At the edges of each check, vLLM 0.33 (the stand-in's SamplingParams: its __post_init__ and
    _verify_args) takes the request unchanged; just outside them it refuses or changes it."""
    for sampling in (
        SamplingConfig(temperature=0.01, num_samples=16384),
        SamplingConfig(temperature=2, seed=0),
        SamplingConfig(top_p=1.0, top_k=1, repetition_penalty=0.01),
        SamplingConfig(do_sample=False, num_samples=1, max_new_tokens=1),
    ):
        kwargs = VLLMChatBackend.sampling_kwargs(sampling)
        params = vllm_standin.SamplingParams(**kwargs)
        assert {key: getattr(params, key) for key in kwargs} == kwargs
    for outside in ({"temperature": 2.01}, {"n": 16385}):
        with pytest.raises(vllm_standin.VLLMValidationError):
            vllm_standin.SamplingParams(**outside)
    assert vllm_standin.SamplingParams(temperature=0.005).temperature == 0.01  # silently changed
    assert vllm_standin.SamplingParams(seed=-1).seed is None  # unseeded: not reproducible
    # greedy decoding with several samples: vLLM refuses it (and transformers too), so the config does
    with pytest.raises(vllm_standin.VLLMValidationError, match="n must be 1 when using greedy sampling, got 3"):
        vllm_standin.SamplingParams(n=3, temperature=0.0)
    with pytest.raises(
        ValueError, match=r"sampling.num_samples=3 with do_sample=false: greedy decoding gives one reply"
    ):
        SamplingConfig(do_sample=False, num_samples=3)
