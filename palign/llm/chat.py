"""Chat templating: the one place where a user turn becomes the tokens a model sees.

Every stage (SFT prompts, the self-judge, prefix continuation, evaluation) sends a single user turn
through the model's own chat template with the generation prompt appended; the config's
`chat_template_kwargs` carry template switches such as Qwen3's `enable_thinking: false` (the paper
disables thinking for every student, PAPER.md §2.1 item 6 and §2.4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def render_user_turn(tokenizer, user_text: str, chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The template text for one user turn followed by the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; the paper's prompts need an instruct model"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}],
        tokenize=False,
        add_generation_prompt=True,
        **dict(chat_template_kwargs or {}),
    )


def encode_user_turn(tokenizer, user_text: str, chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids of `render_user_turn` (the template already holds any special tokens it wants)."""
    text = render_user_turn(tokenizer, user_text, chat_template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response_text: str) -> list[int]:
    """Token ids of an assistant response closed by the end-of-turn token the model must learn."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to end the response with")
    return tokenizer(response_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def instruction_prompt(prompts: Mapping[str, Any], question: str) -> str:
    """The paper's inference instruction followed by the problem (`conf/prompts/*.yaml`)."""
    return prompts["instruction"] + prompts["question_separator"] + question
