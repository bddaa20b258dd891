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

The one thing taken from the model is where a reply ends, and there `generate` stops where vLLM
stops: at the tokenizer's eos token and at every `eos_token_id` of the model's generation_config
(`stop_token_ids`; Qwen2.5 lists <|im_end|> and <|endoftext|>). vLLM 0.33 adds the latter to each
request's stop tokens (vllm/sampling_params.py: SamplingParams.update_from_generation_config, called
by vllm/v1/engine/input_processor.py: InputProcessor.process_inputs with the tokenizer's eos).

The checks of `SamplingConfig` are vLLM's limits on the values palign sends it
(vllm/sampling_params.py: SamplingParams._verify_args and __post_init__), so a config vLLM would
refuse fails when it is checked, not on the GPU; the Hugging Face path is held to them too, so
both back ends accept the same configs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from palign.knobs import at_least, is_int, knob, number
from palign.llm.chat import encode_user_turn

# vLLM 0.33's limits (vllm/sampling_params.py) on what palign sends it
VLLM_MAX_N = 16384  # _verify_num_sequences: envs.VLLM_MAX_N_SEQUENCES' default
VLLM_MAX_TEMPERATURE = 2  # _verify_args: "temperature must be in [0, 2]"
VLLM_MIN_TEMPERATURE = 1e-2  # __post_init__ raises a temperature in (0, 0.01) to 0.01 (_MAX_TEMP)


@dataclass
class SamplingConfig:
    """Decoding settings, and the `sampling` node of every stage's config (palign/schema.py: Sampling
    is this class, so its defaults live here only); the defaults are the authors' (T=0.6, top-p 0.9,
    repetition penalty 1.05).

    top_k: keep only the k most likely tokens; None (or 0) turns it off, as the authors' vLLM
    sampling had it. Nothing else filters or penalises tokens (see the module docstring).
    Each check is vLLM's rule for the value palign sends it (see the module docstring).
    """

    max_new_tokens: int = knob(
        32768, "new tokens per sample (the paper's released outputs ran to ~32k)", check=at_least(1)
    )
    do_sample: bool = knob(True, "sample (true) or decode greedily (false: one sample per prompt)")
    temperature: float = knob(
        0.6,
        "sampling temperature (the authors' 0.6); vLLM refuses more than 2 and samples at "
        "0.01 below 0.01, so both are refused; greedy decoding is do_sample=false",
        check=number(VLLM_MIN_TEMPERATURE, VLLM_MAX_TEMPERATURE),
    )
    top_p: float = knob(0.9, "nucleus sampling mass (the authors' 0.9)", check=number(0, 1, low_open=True))
    top_k: int | None = knob(
        None,
        "null: off, as in the authors' vLLM sampling (never the model's own default)",
        check=("null, 0 (off) or an integer >= 1", lambda v: v is None or (is_int(v) and v >= 0)),
    )
    repetition_penalty: float = knob(1.05, "the authors' 1.05", check=number(0, low_open=True))
    num_samples: int = knob(
        1,
        f"samples per prompt (vLLM's n: at most {VLLM_MAX_N})",
        check=(f"an integer >= 1 and <= {VLLM_MAX_N}", lambda v: is_int(v) and 1 <= v <= VLLM_MAX_N),
    )
    batch_size: int = knob(8, "prompts per generation call", check=at_least(1))
    seed: int = knob(
        0,
        "sampling seed (per problem and sample, so results do not depend on batching); vLLM reads -1 "
        "as no seed, so seeds are >= 0",
        check=at_least(0),
    )

    def __post_init__(self) -> None:
        # the schema checks a composed config field by field; a SamplingConfig built in code gets
        # top_k's check too, and every one gets the check that needs two fields
        allowed, test = self.__dataclass_fields__["top_k"].metadata["check"]
        if not test(self.top_k):
            raise ValueError(f"sampling.top_k must be {allowed}, got {self.top_k!r}")
        if not self.do_sample and self.num_samples != 1:
            # vllm/sampling_params.py: SamplingParams._verify_greedy_sampling ("n must be 1 when using
            # greedy sampling"); transformers refuses num_return_sequences > 1 without sampling too
            raise ValueError(
                f"sampling.num_samples={self.num_samples} with do_sample=false: greedy decoding gives one "
                "reply per prompt (vLLM and transformers refuse more); set do_sample=true or num_samples=1"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> SamplingConfig:
        if isinstance(cfg, SamplingConfig):
            return cfg
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"sampling config: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a reply, as vLLM stops (see the module docstring): the tokenizer's eos,
    then each `eos_token_id` (an id or a list) of the model's generation_config."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in [listed] if is_int(listed) else list(listed or []):
        if token not in stops:
            stops.append(int(token))
    return stops


def generation_config(
    sampling: SamplingConfig | Mapping[str, Any], pad_token_id: int | None, eos_token_id: int | Sequence[int] | None
):
    """The complete transformers `GenerationConfig` for `sampling`: every knob that changes which
    token is drawn is set, so none is taken from the model's generation_config.json. `eos_token_id`:
    the token, or tokens, that end a reply (`stop_token_ids`)."""
    from transformers import GenerationConfig

    sampling = SamplingConfig.from_config(sampling)
    values: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=sampling.num_samples,
        pad_token_id=pad_token_id,
        eos_token_id=list(eos_token_id) if isinstance(eos_token_id, Sequence) else eos_token_id,
        do_sample=sampling.do_sample,
        num_beams=1,
        # logits processors, applied in greedy decoding too
        repetition_penalty=sampling.repetition_penalty,
        encoder_repetition_penalty=1.0,  # decoder-only models count the prompt as the "encoder input"
        no_repeat_ngram_size=0,
    )
    if sampling.do_sample:
        # warpers (sampling only); 0 is transformers' "off" for top_k (None would mean 50 or the model's)
        values.update(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or 0,
            min_p=0.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
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
    finished: bool  # ended with a stop token (`stop_token_ids`) rather than at max_new_tokens


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
    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator_seed = torch.Generator().manual_seed(sampling.seed)
    config = generation_config(sampling, pad_id, stops)
    # transformers 4.50-4.x fills "default-looking" values (e.g. temperature=1.0) from the model's
    # generation_config unless told not to; 5.x fills only unset ones, which `config` has none of
    extra = (
        {"use_model_defaults": False} if "use_model_defaults" in inspect.signature(model.generate).parameters else {}
    )
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
                    # the reply ends at its first stop token, which it does not count; what follows
                    # is padding (a reply that never stopped has none)
                    end = next((j for j, token in enumerate(tokens) if token in stops), None)
                    finished = end is not None
                    if finished:
                        tokens = tokens[:end]
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    results[i].append(Generation(text=text, num_tokens=len(tokens), finished=finished))
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results
