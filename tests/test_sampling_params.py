"""Every back end samples with exactly the configured parameters, whatever the model's generation_config says.

transformers completes a generation request from the model's generation_config.json (Qwen2.5 and
Qwen3 ship top_k 20, a repetition penalty, ...) and its own defaults (top_k 50); vLLM, which the
authors sampled with, applies only what a request carries. These tests give the tiny model a saved
generation_config.json full of such settings and check that palign's decoding ignores all of them.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from palign.llm.generation import SamplingConfig, generate, generation_config
from palign.llm.openai_backend import OpenAIChatBackend
from palign.llm.vllm_backend import VLLMChatBackend

# what a model could ship in generation_config.json; each one would change the sampled tokens
MODEL_DEFAULTS = {"do_sample": True, "temperature": 0.3, "top_k": 20, "top_p": 0.5, "min_p": 0.2, "typical_p": 0.5,
                  "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "epsilon_cutoff": 0.01}
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
    logits, scores = processed_scores(opinionated_model, smollm2_tokenizer, SamplingConfig(max_new_tokens=4, temperature=0.5, top_p=1.0, repetition_penalty=1.0))
    assert torch.allclose(scores, logits / 0.5)  # the configured temperature is applied, and only it


def test_a_configured_top_k_keeps_exactly_k_tokens(opinionated_model, smollm2_tokenizer):
    _, scores = processed_scores(opinionated_model, smollm2_tokenizer, SamplingConfig(max_new_tokens=4, top_p=1.0, top_k=5))
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
    backend = OpenAIChatBackend("http://127.0.0.1:9/v1", "m", api_key_env=None)
    payload = backend._payload("Hi", SamplingConfig(top_k=5, repetition_penalty=1.0), n=1, seed=0)
    assert "top_k" not in payload  # not an OpenAI parameter: OpenAI itself rejects it
    with caplog.at_level(logging.WARNING, logger="palign.llm.openai_backend"):
        backend.complete([], SamplingConfig(top_k=5, repetition_penalty=1.0))
    assert any("top_k=5 is not an OpenAI API parameter" in m for m in caplog.messages)
    vllm_server = OpenAIChatBackend("http://127.0.0.1:9/v1", "m", api_key_env=None, extra_body={"top_k": 5})
    assert vllm_server._payload("Hi", SamplingConfig(top_k=5), n=1, seed=0)["top_k"] == 5
