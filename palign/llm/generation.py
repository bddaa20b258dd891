"""Batched generation on Hugging Face models, shared by continuation, evaluation and teacher generation.

Prompts are single user turns rendered by `palign.llm.chat`; they are sorted by length so each
batch wastes little padding, left-padded so every row ends at the generation point, and the
outputs are returned in the caller's order.

Decoding uses exactly the configured `SamplingConfig`. transformers would otherwise complete it
from the model's generation_config.json and its own defaults (top_k 50 for any model, 20 for
Qwen2.5/Qwen3, their repetition penalty, min_p, ...), while vLLM, which the authors sampled with,
applies only the parameters a request carries; palign's back ends share one cache, so they must
sample alike. `generation_config` therefore sets every sampling knob transformers reads, each to
its configured value or to the value that turns it off.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from palign.knobs import INTEGER, at_least, is_int, knob, number
from palign.llm.chat import encode_user_turn


@dataclass
class SamplingConfig:
    """Decoding settings, and the `sampling` node of every stage's config (palign/schema.py: Sampling
    is this class, so its defaults live here only); the defaults are the authors' (T=0.6, top-p 0.9,
    repetition penalty 1.05).

    top_k: keep only the k most likely tokens; None (or 0) turns it off, as the authors' vLLM
    sampling had it. Nothing else filters or penalises tokens (see the module docstring).
    """

    max_new_tokens: int = knob(32768, "new tokens per sample (the paper's released outputs ran to ~32k)", check=at_least(1))
    do_sample: bool = knob(True, "sample (true) or decode greedily (false)")
    temperature: float = knob(0.6, "sampling temperature (the authors' 0.6)", check=number(0))
    top_p: float = knob(0.9, "nucleus sampling mass (the authors' 0.9)", check=number(0, 1, low_open=True))
    top_k: int | None = knob(None, "null: off, as in the authors' vLLM sampling (never the model's own default)",
                             check=("null, 0 (off) or an integer >= 1", lambda v: v is None or (is_int(v) and v >= 0)))
    repetition_penalty: float = knob(1.05, "the authors' 1.05", check=number(0, low_open=True))
    num_samples: int = knob(1, "samples per prompt", check=at_least(1))
    batch_size: int = knob(8, "prompts per generation call", check=at_least(1))
    seed: int = knob(0, "sampling seed (per problem and sample, so results do not depend on batching)", check=INTEGER)

    def __post_init__(self) -> None:
        # the schema checks a composed config; a SamplingConfig built in code gets top_k's check too
        allowed, test = self.__dataclass_fields__["top_k"].metadata["check"]
        if not test(self.top_k):
            raise ValueError(f"sampling.top_k must be {allowed}, got {self.top_k!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> SamplingConfig:
        if isinstance(cfg, SamplingConfig):
            return cfg
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"sampling config: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def generation_config(sampling: SamplingConfig | Mapping[str, Any], pad_token_id: int | None, eos_token_id: int | None):
    """The complete transformers `GenerationConfig` for `sampling`: every knob that changes which
    token is drawn is set, so none is taken from the model's generation_config.json."""
    from transformers import GenerationConfig

    sampling = SamplingConfig.from_config(sampling)
    values: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=sampling.num_samples,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        do_sample=sampling.do_sample,
        num_beams=1,
        # logits processors, applied in greedy decoding too
        repetition_penalty=sampling.repetition_penalty,
        encoder_repetition_penalty=1.0,  # decoder-only models count the prompt as the "encoder input"
        no_repeat_ngram_size=0,
    )
    if sampling.do_sample:
        # warpers (sampling only); 0 is transformers' "off" for top_k (None would mean 50 or the model's)
        values.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
                      min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    return GenerationConfig(**values)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned, so all rows end where the next
    token goes; padded positions have mask 0."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    return input_ids, attention


@dataclass
class Generation:
    text: str
    num_tokens: int
    finished: bool  # ended with the end-of-turn token rather than at max_new_tokens


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    user_texts: Sequence[str],
    sampling: SamplingConfig | Mapping[str, Any],
    chat_template_kwargs: Mapping[str, Any] | None = None,
    progress: str | None = None,
) -> list[list[Generation]]:
    """`sampling.num_samples` generations for each user turn, in input order."""
    sampling = SamplingConfig.from_config(sampling)
    encoded = [encode_user_turn(tokenizer, text, chat_template_kwargs) for text in user_texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[list[Generation]] = [[] for _ in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator_seed = torch.Generator().manual_seed(sampling.seed)
    config = generation_config(sampling, pad_id, eos_id)
    # transformers 4.50-4.x fills "default-looking" values (e.g. temperature=1.0) from the model's
    # generation_config unless told not to; 5.x fills only unset ones, which `config` has none of
    extra = {"use_model_defaults": False} if "use_model_defaults" in inspect.signature(model.generate).parameters else {}
    bar = tqdm(total=len(encoded), desc=progress, disable=progress is None, unit="prompt")
    try:
        for start in range(0, len(order), sampling.batch_size):
            batch = order[start : start + sampling.batch_size]
            input_ids, attention = left_pad([encoded[i] for i in batch], pad_id)
            width = input_ids.shape[1]
            if sampling.do_sample:
                # one seed per batch position keeps sampling reproducible across resumed runs
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config, **extra
            )
            new_tokens = out[:, width:].cpu()
            for row, i in enumerate(batch):
                for s in range(sampling.num_samples):
                    tokens = new_tokens[row * sampling.num_samples + s].tolist()
                    finished = eos_id in tokens
                    if finished:
                        tokens = tokens[: tokens.index(eos_id)]
                    while tokens and tokens[-1] == pad_id:
                        tokens.pop()
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    results[i].append(Generation(text=text, num_tokens=len(tokens), finished=finished))
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results
