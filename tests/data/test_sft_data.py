"""SFT formatting: exact loss mask, supervised end-of-turn token, over-length drops, token cache."""

from __future__ import annotations

import pytest

from palign.data.sft import IGNORE_INDEX, SFTCollator, SupervisedExample, build_tokenized_split, tokenize_example
from palign.llm.chat import render_user_turn

PROMPTS = {
    "instruction": "Please reason step by step, and put your final answer within \\boxed{}.",
    "question_separator": "\n",
}


def test_labels_mask_every_prompt_token_and_supervise_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    question, target = "What is 2+3?", "2 + 3 = 5, so the answer is \\boxed{5}."
    example = tokenize_example(tok, PROMPTS, question, target)
    prompt_text = render_user_turn(tok, PROMPTS["instruction"] + "\n" + question)
    n_prompt = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert all(label != IGNORE_INDEX for label in labels[n_prompt:])
    assert labels[n_prompt:] == ids[n_prompt:]
    # the response ends with the end-of-turn token, and that token is supervised
    assert ids[-1] == tok.eos_token_id == labels[-1]
    assert tok.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"
    # the prompt is the chat template of the instruction + question with the assistant header
    decoded_prompt = tok.decode(ids[:n_prompt])
    assert decoded_prompt.endswith("<|im_start|>assistant\n")
    assert PROMPTS["instruction"] + "\n" + question in decoded_prompt
    assert tok.decode(ids[n_prompt:-1]) == target


def test_overlength_examples_are_dropped_and_counted(smollm2_tokenizer, tmp_path):
    short = SupervisedExample("a", "1+1?", "It is \\boxed{2}.")
    long = SupervisedExample("b", "Count.", " ".join(str(i) for i in range(400)))
    lengths = {
        e.id: len(tokenize_example(smollm2_tokenizer, PROMPTS, e.question, e.target)["input_ids"])
        for e in (short, long)
    }
    max_length = lengths["a"] + 5
    assert lengths["b"] > max_length
    split = build_tokenized_split(
        [short, long, short.__class__("c", "2+2?", "\\boxed{4}")],
        smollm2_tokenizer,
        PROMPTS,
        max_length,
        tmp_path,
        "train",
    )
    assert split.kept == 2 and split.dropped_too_long == 1
    import datasets

    data = datasets.load_from_disk(str(split.path))
    assert data["id"] == ["a", "c"]
    assert max(data["length"]) <= max_length  # nothing was truncated to fit


def test_tokenized_cache_is_reused_and_keyed_by_content(smollm2_tokenizer, tmp_path, monkeypatch):
    examples = [SupervisedExample("a", "1+1?", "\\boxed{2}")]
    first = build_tokenized_split(examples, smollm2_tokenizer, PROMPTS, 256, tmp_path, "train")
    import palign.data.sft as sft

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again although the cache matches")

    monkeypatch.setattr(sft, "tokenize_example", fail)
    again = build_tokenized_split(examples, smollm2_tokenizer, PROMPTS, 256, tmp_path, "train")
    assert again.path == first.path
    with pytest.raises(AssertionError, match="tokenized again"):
        build_tokenized_split(examples, smollm2_tokenizer, PROMPTS, 257, tmp_path, "train")


def test_collator_right_pads_with_ignored_labels():
    batch = SFTCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8], "labels": [8]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
