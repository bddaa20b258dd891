"""The sufficiency judge on real models: prompt text, batched scoring, both decision modes."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from palign.schema import JudgePrompt
from palign.truncation.judge import SufficiencyJudge, is_sufficient_reply, render_prompt
from palign.truncation.units import Segmentation, split_paper_sentences, split_sentences, split_steps
from tests.conftest import PROJECT_ROOT

PAPER_PROMPT = """
You are a reasoning evaluator.

You are given a partial reasoning prefix extracted from a longer chain-of-thought.
Your task is to judge whether this prefix already contains the essential logical structure and key transformations needed to complete the solution.

- Reply "[ENOUGH]" if the prefix establishes the core reasoning steps such that the remaining reasoning is straightforward or routine.
- Reply "[NOT_ENOUGH]" if any crucial reasoning step is still missing, making it difficult to reliably complete the solution.

Reply with exactly one token: [ENOUGH] or [NOT_ENOUGH].

Question:
{question}

Partial reasoning:
{reasoning_part}
"""  # noqa: E501 (the paper's prompt, verbatim)


def load_prompt(name: str) -> JudgePrompt:
    return JudgePrompt(
        **OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "truncation" / "judge_prompt" / f"{name}.yaml"))
    )


def segment(text: str, granularity: str) -> Segmentation:
    return {"paper_sentence": split_paper_sentences, "sentence": split_sentences, "step": split_steps}[granularity](
        text
    )


def test_paper_prompt_is_verbatim_and_renders_latex_safely():
    prompt = load_prompt("paper")
    assert prompt.template == PAPER_PROMPT
    text = render_prompt(prompt, "Find $\\frac{a}{b}$ if {x}.", "We set $x^{2}$.")
    assert "Question:\nFind $\\frac{a}{b}$ if {x}.\n\nPartial reasoning:\nWe set $x^{2}$.\n" in text


def test_authors_reply_parse():
    prompt = load_prompt("paper")
    assert is_sufficient_reply(prompt, "[ENOUGH]")
    assert is_sufficient_reply(prompt, "I think [ENOUGH] because ...")
    assert is_sufficient_reply(prompt, "  ENOUGH \n")
    assert not is_sufficient_reply(prompt, "[NOT_ENOUGH]")
    assert not is_sufficient_reply(prompt, "The prefix is enough.")


def test_verdict_tokens_are_read_after_their_shared_prefix(smollm2_tokenizer, tiny_model):
    judge = SufficiencyJudge.hf(tiny_model, smollm2_tokenizer, load_prompt("paper"))
    assert smollm2_tokenizer.convert_ids_to_tokens(judge.verdict_prefix) == ["["]
    assert smollm2_tokenizer.convert_ids_to_tokens([judge.enough_token, judge.not_enough_token]) == ["EN", "NOT"]


def test_batched_left_padded_scores_equal_one_by_one(smollm2_tokenizer, tiny_model):
    judge = SufficiencyJudge.hf(tiny_model, smollm2_tokenizer, load_prompt("paper"), batch_size=4)
    trace = "First we factor. Then we expand the product. Next we compare terms. So x = 3. Done."
    seg = segment(trace, "sentence")
    pairs = [("Solve x^2 = 9 for positive x.", seg.prefix(k)) for k in range(1, seg.m + 1)]
    batched = judge.score(pairs)
    single = [judge.score([pair])[0] for pair in pairs]
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(round(s, 5) for s in batched)) > 1  # different prefixes, different scores


def _one_pass_vs_batched(model, tokenizer, question, trace, granularity, prompt="paper"):
    seg = segment(trace, granularity)
    ks = list(range(1, seg.m + 1))
    one_pass = SufficiencyJudge.hf(model, tokenizer, load_prompt(prompt), engine="one_pass").prefix_scores(
        [(question, seg, ks)]
    )[0]
    batched = SufficiencyJudge.hf(model, tokenizer, load_prompt(prompt), engine="batched", batch_size=4).prefix_scores(
        [(question, seg, ks)]
    )[0]
    return seg, one_pass, batched


def test_one_pass_scores_equal_scoring_each_prefix_from_scratch_tiny(tiny_model, smollm2_tokenizer):
    trace = "We have $x^2 = 9$. So $x = 3$ or $x = -3$.\n\nSince x > 0, x = 3. Check: 3.5 is not it. Done!"
    for granularity in ("sentence", "paper_sentence", "step"):
        seg, one_pass, batched = _one_pass_vs_batched(
            tiny_model, smollm2_tokenizer, "Solve x^2 = 9, x > 0.", trace, granularity
        )
        assert sorted(one_pass) == sorted(batched) == list(range(1, seg.m + 1))
        for k in one_pass:
            assert one_pass[k] == pytest.approx(batched[k], abs=1e-4)


def test_one_pass_tails_split_over_forwards_and_eager_attention_agree(
    student_specs, cache_dir, smollm2_tokenizer, monkeypatch
):
    """The tails' mask must hold whatever the attention kernel and however many tails share a forward;
    kernels without arbitrary masks take the cropping path, which must agree too."""
    import palign.truncation.judge as judge_module
    from palign.llm.models import load_model

    trace = "Let n be even. Then n = 2k. So n^2 = 4k^2. Hence 4 divides n^2. Thus the claim holds. Done."
    seg = segment(trace, "sentence")
    ks = [1, 3, 4, seg.m]  # a subset: the forward covers unit max(ks), tails only where asked
    question = "Show 4 | n^2 for even n."
    reference = SufficiencyJudge.hf(
        load_model(student_specs["tiny_random"], cache_dir), smollm2_tokenizer, load_prompt("paper"), engine="batched"
    ).prefix_scores([(question, seg, ks)])[0]
    eager = load_model(student_specs["tiny_random"], cache_dir)
    eager.set_attn_implementation("eager")
    for model, max_tail_tokens in (
        (eager, 4096),
        (eager, 1),
        (load_model(student_specs["tiny_random"], cache_dir), 20),
    ):
        judge = SufficiencyJudge.hf(
            model, smollm2_tokenizer, load_prompt("paper"), engine="one_pass", max_tail_tokens=max_tail_tokens
        )
        scores = judge.prefix_scores([(question, seg, ks)])[0]
        assert sorted(scores) == ks
        for k in ks:
            assert scores[k] == pytest.approx(reference[k], abs=1e-4), (
                model.config._attn_implementation,
                max_tail_tokens,
                k,
            )
    monkeypatch.setattr(judge_module, "MASKABLE_ATTENTION", ())  # as for flash attention
    cropped = SufficiencyJudge.hf(eager, smollm2_tokenizer, load_prompt("paper"), engine="one_pass").prefix_scores(
        [(question, seg, ks)]
    )[0]
    assert cropped == pytest.approx(reference, abs=1e-4)


@pytest.mark.slow
def test_one_pass_scores_equal_scoring_from_scratch_on_smollm2(shared_data, student_specs, cache_dir):
    from palign.llm.models import load_model, load_tokenizer

    row = json.loads((shared_data / "teacher" / "skyt1_14b_amc23_longcot.jsonl").read_text().splitlines()[0])
    tokenizer = load_tokenizer(student_specs["smollm2_135m"], cache_dir)
    model = load_model(student_specs["smollm2_135m"], cache_dir)
    trace = row["code"][0].split("<|end_of_thought|>")[0].replace("<|begin_of_thought|>", "").strip()
    seg, one_pass, batched = _one_pass_vs_batched(model, tokenizer, row["question"], trace[:2500], "sentence")
    assert seg.m > 10
    worst = max(abs(one_pass[k] - batched[k]) for k in one_pass)
    assert worst < 1e-3, worst
    assert len({round(v, 3) for v in one_pass.values()}) > seg.m // 2  # real, varied scores


@pytest.mark.slow
def test_smollm2_self_judge_both_modes_on_real_skyt1_traces(shared_data, student_specs, cache_dir):
    """The real SmolLM2 judge in both modes on the 3 shortest Sky-T1 AMC23 traces."""
    from palign.llm.models import load_model, load_tokenizer
    from palign.truncation.search import BinaryPrefixSearch, run_searches

    rows = [
        json.loads(line)
        for line in (shared_data / "teacher" / "skyt1_14b_amc23_longcot.jsonl").read_text().splitlines()
    ]
    rows = sorted(rows, key=lambda r: len(r["code"][0]))[:3]
    tokenizer = load_tokenizer(student_specs["smollm2_135m"], cache_dir)
    model = load_model(student_specs["smollm2_135m"], cache_dir)
    prompt = load_prompt("paper")
    verdicts = {}
    for mode in ("logits", "generate"):
        judge = SufficiencyJudge.hf(model, tokenizer, prompt, mode=mode, max_new_tokens=24, batch_size=3)
        segs = [segment(r["code"][0], "paper_sentence") for r in rows]
        states = [BinaryPrefixSearch(s.m) for s in segs]

        def judge_batch(requests):
            return judge.judge([(rows[i]["question"], segs[i].prefix(k)) for i, k in requests])  # noqa: B023 (run_searches calls it in this iteration)

        results = run_searches(states, judge_batch, batch_size=3)
        for result, seg in zip(results, segs):
            assert 1 <= result.chosen_k <= seg.m
            assert len(result.probes) <= (seg.m + 1).bit_length()
        if mode == "logits":
            assert all(p.score is not None and p.reply is None for r in results for p in r.probes)
        else:
            assert all(p.reply is not None and p.score is None for r in results for p in r.probes)
        verdicts[mode] = results
    # the same first probe (mid of [1, m]) is judged by both modes: report how often they agree
    first = [(a.probes[0].sufficient, b.probes[0].sufficient) for a, b in zip(verdicts["logits"], verdicts["generate"])]
    print("first-probe agreement logits vs generate:", sum(x == y for x, y in first), "/", len(first))


@pytest.mark.parametrize("architecture", ["Qwen2", "Qwen3"])
def test_one_pass_engine_on_the_paper_students_architectures(architecture, smollm2_tokenizer):
    """The paper's students are Qwen2.5 and Qwen3: the masked tails must hold on their attention too."""
    import torch
    import transformers

    config_class = getattr(transformers, f"{architecture}Config")
    model_class = getattr(transformers, f"{architecture}ForCausalLM")
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attn_implementation="sdpa",
    )
    model = model_class(config).eval()
    seg = segment("Let n be even. Then n = 2k. So n^2 = 4k^2. Hence 4 divides n^2. Thus the claim holds.", "sentence")
    ks = list(range(1, seg.m + 1))
    engines = {
        engine: SufficiencyJudge.hf(model, smollm2_tokenizer, load_prompt("paper"), engine=engine).prefix_scores(
            [("Show 4 | n^2 for even n.", seg, ks)]
        )[0]
        for engine in ("one_pass", "batched")
    }
    assert engines["one_pass"] == pytest.approx(engines["batched"], abs=1e-4)
    assert len({round(v, 4) for v in engines["one_pass"].values()}) > 1
