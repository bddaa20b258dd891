"""SFT examples: the paper's instruction prompt plus a supervision target, loss on the response only.

Method step 4 (PAPER.md §1.3, §2.3): the prompt is the chat template of "Please reason step by
step, and put your final answer within \\boxed{}." plus the question; the response is the
baseline's target (full Long-CoT, short CoT, prefix markers + teacher prefix + student
continuation, ...) closed by the model's end-of-turn token. Labels are -100 on every prompt token
and the end-of-turn token is supervised. Examples longer than `max_length` are dropped and counted,
never silently truncated: a truncated target teaches the student to stop mid-thought.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from palign.artifacts.digests import fingerprint
from palign.artifacts.readers import read_json
from palign.artifacts.stores import exclusive
from palign.artifacts.writes import atomic_path, write_json_atomic
from palign.llm.chat import encode_response, encode_user_turn, instruction_prompt

log = logging.getLogger(__name__)

# Stored tokenized examples depend on this code as well as on the settings: bump CODE_VERSION when a
# change here changes what is stored, so caches written by older code are never reused
# (tests/integration/test_stage_versions.py notices a change to the logic that did not bump it).
CODE_VERSION = 1

IGNORE_INDEX = -100


@dataclass
class SupervisedExample:
    """One SFT example: the question (prompted with the paper's instruction) and its target."""

    id: str
    question: str
    target: str
    meta: dict[str, Any] = field(default_factory=dict)


def tokenize_example(
    tokenizer,
    prompts: Mapping[str, Any],
    question: str,
    target: str,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, list[int]]:
    prompt_ids = encode_user_turn(tokenizer, instruction_prompt(prompts, question), chat_template_kwargs)
    response_ids = encode_response(tokenizer, target)
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {
        "name": tokenizer.name_or_path.split("/models/")[-1],
        "vocab": hashlib.sha256(vocab.encode()).hexdigest()[:16],
        "template": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16],
        "eos": tokenizer.eos_token,
    }


@dataclass
class TokenizedSplit:
    path: Path
    kept: int
    dropped_too_long: int
    response_tokens: int


def build_tokenized_split(
    examples: Sequence[SupervisedExample],
    tokenizer,
    prompts: Mapping[str, Any],
    max_length: int,
    cache_dir: str | Path,
    split: str,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> TokenizedSplit:
    """Tokenize (or reuse the cached tokenization of) a split, dropping over-length examples.

    The cache folder is named by a fingerprint of everything that changes the tokens: the
    examples, the tokenizer's vocabulary and chat template, the prompts and `max_length`.
    """
    key = fingerprint(
        CODE_VERSION,
        [asdict(e) for e in examples],
        tokenizer_identity(tokenizer),
        dict(prompts),
        dict(chat_template_kwargs or {}),
        max_length,
    )
    folder = Path(cache_dir) / "tokenized" / f"{split}-{key}"
    with exclusive(folder):  # processes sharing the cache tokenize once
        return _tokenize_split(examples, tokenizer, prompts, max_length, folder, split, chat_template_kwargs)


def _tokenize_split(
    examples, tokenizer, prompts, max_length, folder: Path, split: str, chat_template_kwargs
) -> TokenizedSplit:
    import datasets

    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = read_json(meta_path)
        log.info("%s: reusing tokenized data %s", split, folder)
        return TokenizedSplit(folder / "data", meta["kept"], meta["dropped_too_long"], meta["response_tokens"])

    rows: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "length": []}
    dropped = 0
    response_tokens = 0
    for example in examples:
        tokens = tokenize_example(tokenizer, prompts, example.question, example.target, chat_template_kwargs)
        if len(tokens["input_ids"]) > max_length:
            dropped += 1
            continue
        rows["id"].append(example.id)
        rows["input_ids"].append(tokens["input_ids"])
        rows["labels"].append(tokens["labels"])
        rows["length"].append(len(tokens["input_ids"]))
        response_tokens += sum(1 for label in tokens["labels"] if label != IGNORE_INDEX)
    if dropped:
        log.warning(
            "%s: dropped %d of %d examples longer than max_length=%d tokens", split, dropped, len(examples), max_length
        )
    with atomic_path(folder) as tmp:
        datasets.Dataset.from_dict(rows).save_to_disk(str(tmp / "data"))
        write_json_atomic(
            tmp / "meta.json",
            {
                "kept": len(rows["id"]),
                "dropped_too_long": dropped,
                "response_tokens": response_tokens,
                "max_length": max_length,
            },
        )
    return TokenizedSplit(folder / "data", len(rows["id"]), dropped, response_tokens)


class SFTCollator:
    """Right-pads a batch; padded positions get attention 0 and label -100.

    An empty batch (the filler that evens out the ranks' validation shards, palign/data/sampling.py:
    ShardedEvalBatches) becomes one row of two padding tokens, every label -100: a forward (each
    rank runs the same number) that adds nothing to the token-weighted loss.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not batch:
            batch = [{"input_ids": [self.pad_token_id] * 2, "labels": [IGNORE_INDEX] * 2}]
        width = max(len(row["input_ids"]) for row in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class PackedSFTCollator:
    """Padding-free packing: a micro-batch's bins of examples flattened into ONE row.

    Under `data.packing` a micro-batch is `micro_batch_size` bins of examples (each bin up to
    `data.pack_length` tokens, palign/data/sampling.py: `pack_examples`), and this collator
    concatenates every example of every bin into a single row `[1, total tokens]`: no padding at
    all, `position_ids` restarting at 0 at each example, and no attention mask. One row is the
    layout from which every attention kernel of transformers reads the example boundaries:

    - sdpa, eager and flex build a block-diagonal causal mask from the restarting positions, in any
      number of rows (transformers/masking_utils.py: `find_packed_sequence_indices`, used when the
      attention mask is None);
    - flash attention reads them from the positions only for a batch of one row
      (transformers/modeling_flash_attention_utils.py: `_is_packed_sequence` is False when
      `batch_size != 1`; then `prepare_fa_kwargs_from_position_ids` cuts the varlen kernel's
      `cu_seqlens` at every position 0). Several packed rows would run plain causal attention over
      each row, every example attending to the ones before it, silently.

    The label of each example's first token is -100 (whatever the example's own label there): it
    is the target of the previous example's last token, so no loss crosses a boundary.
    `real_tokens` (all ones: nothing is padding) is what the step's tokens/s and padding fraction count.

    The cost, per forward: flash attention's varlen kernel attends within each example only, so one
    row of B bins costs what B rows would. sdpa and eager materialise a mask over the whole row and
    attend over all of it: B bins of P tokens cost (B*P)^2 instead of B*P^2 in attention FLOPs and
    mask memory, so with those kernels keep `data.micro_batch_size=1` (one bin per forward) and reach
    the effective batch by accumulation.
    """

    def __call__(self, batch: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for examples in batch:
            for example in examples:
                ids.extend(example["input_ids"])
                labels.extend([IGNORE_INDEX, *example["labels"][1:]])
                positions.extend(range(len(example["input_ids"])))
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "real_tokens": torch.ones_like(input_ids),
        }
