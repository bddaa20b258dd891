"""The sufficiency judge: does a prefix of the teacher trace already hold the solution's core?

Method step 2 (PAPER.md §2.1): the student itself reads the question and a prefix and must reply
`[ENOUGH]` or `[NOT_ENOUGH]` to the paper's prompt (`conf/truncation/judge_prompt/paper.yaml`, its only
home), sent as one user turn through the chat template with thinking disabled. Two decision modes:

- `generate` (faithful to the authors): greedy decoding of up to `max_new_tokens` and the authors'
  parse, sufficient iff the reply contains `[ENOUGH]` or is exactly `ENOUGH`. The authors sampled
  with the model's default generation config; greedy makes the verdict reproducible.
- `logits` (deterministic, one forward pass): the log-odds of the model continuing its reply with
  the `[ENOUGH]` rather than the `[NOT_ENOUGH]` verdict, read at the first token where the two
  verdicts' tokenizations differ (both share the `[` before it). The score is recorded; the
  verdict compares it with a threshold (`Threshold`).

The judge's context. Every probe is a request of its own (or a position of the one-pass engine's
forward), and a model refuses or degrades beyond its context: vLLM rejects a prompt of
`max_model_len` tokens or more and fails the whole `generate()` call with every other trace of the
chunk (vllm/v1/engine/input_processor.py), and a Hugging Face model runs past its trained positions.
So a probe is sent only when its prompt plus the reply it needs (one token in logits mode,
`max_new_tokens` in generate mode) fits `context_tokens` (`truncation.judge.max_context_tokens`, else
the judge model's own context); a longer probe counts as not sufficient without a judge call. A
long trace is therefore searched like any other (the authors' loop probes half of every trace
first) and falls back to the full trace when nothing that fits is sufficient: no trace leaves the
training set for its length alone, and no request exceeds the context.

Small judges are badly calibrated (SmolLM2-135M never says `[ENOUGH]` in generate mode and prefers
it for every prefix in raw logits), so the threshold can be set relative to the score of the full
trace of the same example, or to a quantile of the scores measured on calibration examples.
"""

from __future__ import annotations

import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from palign.llm.chat import encode_user_turn, render_user_turn
from palign.llm.generation import Generation, SamplingConfig, generate, left_pad
from palign.schema import JUDGE_ENGINES, JUDGE_MODES, JudgePrompt
from palign.truncation.search import Verdict
from palign.truncation.units import Segmentation

_SENTINEL = "\u2063REASONING\u2063"  # an invisible separator that never occurs in prompts

log = logging.getLogger(__name__)

# attention implementations that apply an arbitrary 4D mask (the one-pass engine's batched tails)
MASKABLE_ATTENTION = ("sdpa", "eager")
# Scores of the same prompt in different batches (other padding) agree to ~1e-5, not exactly; a
# prefix scoring within this of a threshold taken from another batch counts as reaching it.
SCORE_TOLERANCE = 1e-4


def render_prompt(prompt: JudgePrompt, question: str, reasoning_part: str) -> str:
    """The judge's user turn: the template with the question and the prefix in place."""
    # plain replacement: questions and traces are full of LaTeX braces that str.format would parse
    return prompt.template.replace("{question}", question).replace("{reasoning_part}", reasoning_part)


def is_sufficient_reply(prompt: JudgePrompt, reply: str) -> bool:
    """The authors' parse of a generated reply: it holds the `enough` verdict, or is that verdict bare."""
    bare = prompt.enough.strip("[]")
    return prompt.enough in reply or reply.strip() == bare


# -- thresholds: when a logits-mode score counts as sufficient (the `truncation.judge.threshold` node) --
class Threshold(ABC):
    """When a `logits`-mode score counts as sufficient: each trace's threshold, from the score of a
    reference prefix of the same trace (`reference_k`) or from a value calibrated once per store.
    Subclasses are frozen dataclasses whose fields are the options their YAML file lists
    (conf/truncation/judge/threshold/); `kind` names them in the store's fingerprint."""

    kind: ClassVar[str]
    value: float
    calibrates: ClassVar[bool] = False  # True: `calibrate` runs once per store before the search

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"truncation.judge.threshold.value must be a finite number, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))  # 1 and 1.0 are one threshold (and one fingerprint)

    def reference_k(self, m: int, fitting: int) -> int | None:
        """The prefix of a trace of `m` units (`fitting` of them fit the judge's context) whose score
        the threshold is taken from; None: none."""
        return None

    @abstractmethod
    def threshold(self, reference_score: float | None, calibrated: float | None) -> float | None:
        """A trace's threshold from its reference prefix's score (None: it has none) and the
        calibrated value (None: not calibrated); None when the trace has no threshold."""

    def identity(self) -> dict[str, Any]:
        """The threshold in the store's fingerprint: its kind and options. `calibration_examples` was
        a field of every threshold before thresholds were classes (8 by default, read by quantile
        only), so a threshold without it names 8 and the stores written then keep their folders."""
        return {"kind": self.kind, "calibration_examples": 8, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class AbsoluteThreshold(Threshold):
    """score >= value (value 0: the judge prefers [ENOUGH])."""

    kind: ClassVar[str] = "absolute"
    value: float

    def threshold(self, reference_score: float | None, calibrated: float | None) -> float:
        return self.value


@dataclass(frozen=True)
class RelativeToFullThreshold(Threshold):
    """score >= score(full trace of the same example) - value: "the prefix convinces the judge
    (almost) as much as the whole trace does". The reference is the longest prefix that fits the
    judge's context (the whole trace when it fits); a trace of which nothing fits has no threshold."""

    kind: ClassVar[str] = "relative_to_full"
    value: float

    def reference_k(self, m: int, fitting: int) -> int | None:
        return min(m, fitting) or None

    def threshold(self, reference_score: float | None, calibrated: float | None) -> float | None:
        return reference_score - self.value if reference_score is not None else None


@dataclass(frozen=True)
class QuantileThreshold(Threshold):
    """score >= the `value` quantile of every prefix score of the first `calibration_examples`
    examples (measured once per store, kept in its calibration.json)."""

    kind: ClassVar[str] = "quantile"
    calibrates: ClassVar[bool] = True
    value: float
    calibration_examples: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.value <= 1:
            raise ValueError(f"truncation.judge.threshold.value: a quantile is in [0, 1], got {self.value!r}")
        examples = self.calibration_examples
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise ValueError(
                f"truncation.judge.threshold.calibration_examples must be an integer >= 1, got {examples!r}"
            )

    def calibrate(self, scores: Sequence[float]) -> float:
        """The `value` quantile of `scores` (sorted): the score at that position."""
        return scores[min(len(scores) - 1, max(0, round(self.value * (len(scores) - 1))))]

    def threshold(self, reference_score: float | None, calibrated: float | None) -> float:
        if calibrated is None:
            raise ValueError("a quantile threshold needs its calibrated value (quantile_threshold)")
        return calibrated


def common_prefix(a: Sequence[int], b: Sequence[int]) -> list[int]:
    out = []
    for x, y in zip(a, b):
        if x != y:
            break
        out.append(x)
    return out


class HFScorer:
    """The judge's Hugging Face scoring back end: one model, verdict scores of whole sequences in
    batches, the one-pass engine (every prefix of a trace from one forward) and greedy replies.

    vLLM's back end (palign/llm/vllm_backend.py: VLLMChatBackend) is the other one: the same
    `verdict_scores` and `complete`, without `one_pass_scores` (its prefix cache shares prefixes).
    """

    one_pass = True  # offers one_pass_scores

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int,
        max_tail_tokens: int,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # sequences per forward
        self.max_tail_tokens = max_tail_tokens  # tail tokens scored per forward by the one-pass engine
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    @torch.inference_mode()
    def one_pass_scores(
        self,
        head: list[int],
        pieces: list[list[int]],
        tail: list[int],
        ks: Sequence[int],
        enough_token: int,
        not_enough_token: int,
    ) -> dict[int, float]:
        """All requested prefixes of one trace from one forward pass over the longest of them.

        The keys/values of "head + first k units" are a prefix of those of "head + first K units",
        so the long shared part runs once, filling a cache. Then the short tails (end of the user
        turn, assistant header, the verdicts' shared first token) of every boundary k run together
        in a second forward on top of that cache: tail k sits at the positions right after unit k,
        and an attention mask lets it see the cache up to unit k and its own earlier tokens only.
        Each tail then computes exactly what it would at the end of prefix k from scratch. Attention
        kernels that ignore such masks (flash attention) crop the cache to each boundary instead,
        in descending k, and run one tail at a time.
        """
        from transformers import DynamicCache

        if not ks:
            return {}
        device = next(self.model.parameters()).device
        boundaries = [len(head)]
        for piece in pieces:
            boundaries.append(boundaries[-1] + len(piece))
        longest = max(ks)
        ids = head + [t for piece in pieces[:longest] for t in piece]
        was_training = self.model.training
        self.model.eval()
        # transformers 5 renamed `past_key_values` to `cache`
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        scores: dict[int, float] = {}
        try:
            cache = DynamicCache(config=self.model.config)
            self.model(
                input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1, **{cache_arg: cache}
            )
            if getattr(self.model.config, "_attn_implementation", "sdpa") in MASKABLE_ATTENTION:
                ordered = sorted(set(ks))
                per_forward = max(1, self.max_tail_tokens // len(tail))
                for start in range(0, len(ordered), per_forward):
                    group = ordered[start : start + per_forward]
                    logits = self._score_tails(cache, cache_arg, len(ids), [boundaries[k] for k in group], tail, device)
                    for k, row in zip(group, logits):
                        scores[k] = float(row[enough_token] - row[not_enough_token])
                    cache.crop(-(cache.get_seq_length() - len(ids)))  # drop the tails again
            else:  # kernels without arbitrary masks (flash attention): crop to each boundary, descending
                tail_ids = torch.tensor([tail], device=device)
                for k in sorted(set(ks), reverse=True):
                    excess = cache.get_seq_length() - boundaries[k]
                    if excess > 0:
                        cache.crop(-excess)  # a negative length removes that many tokens (all versions)
                    positions = torch.arange(boundaries[k], boundaries[k] + len(tail), device=device)[None]
                    row = (
                        self.model(
                            input_ids=tail_ids,
                            position_ids=positions,
                            use_cache=True,
                            logits_to_keep=1,
                            **{cache_arg: cache},
                        )
                        .logits[0, -1]
                        .float()
                    )
                    scores[k] = float(row[enough_token] - row[not_enough_token])
        finally:
            self.model.train(was_training)
        return scores

    def _score_tails(
        self, cache, cache_arg: str, length: int, cuts: Sequence[int], tail: list[int], device
    ) -> torch.Tensor:
        """Next-token logits at the end of `tail` placed after each cut of the cached sequence."""
        n = len(tail)
        queries = len(cuts) * n
        dtype = next(self.model.parameters()).dtype
        allowed = torch.zeros(queries, length + queries, dtype=torch.bool, device=device)
        own = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))
        for block, cut in enumerate(cuts):
            rows = slice(block * n, (block + 1) * n)
            allowed[rows, :cut] = True
            allowed[rows, length + block * n : length + (block + 1) * n] = own
        # an additive float mask works with every attention implementation (eager adds it too)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        positions = torch.cat([torch.arange(cut, cut + n, device=device) for cut in cuts])
        last = torch.arange(n - 1, queries, n, device=device)
        out = self.model(
            input_ids=torch.tensor([tail * len(cuts)], device=device),
            attention_mask=mask[None, None],
            position_ids=positions[None],
            use_cache=True,
            logits_to_keep=last,
            **{cache_arg: cache},
        )
        return out.logits[0].float()

    @torch.inference_mode()
    def verdict_scores(self, encoded: Sequence[Sequence[int]], enough_token: int, not_enough_token: int) -> list[float]:
        """logit(enough) - logit(not enough) after each sequence, `batch_size` sequences per forward."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        scores = [0.0] * len(encoded)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                ids, mask = left_pad([encoded[i] for i in batch], pad)
                # left padding: positions must count real tokens only, or padded rows score differently
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = (
                    self.model(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        position_ids=positions.to(device),
                        logits_to_keep=1,
                    )
                    .logits[:, -1, :]
                    .float()
                )
                diff = logits[:, enough_token] - logits[:, not_enough_token]
                for row, i in enumerate(batch):
                    scores[i] = float(diff[row])
        finally:
            self.model.train(was_training)
        return scores

    def complete(self, user_texts: Sequence[str], sampling: SamplingConfig) -> list[list[Generation]]:
        return generate(
            self.model, self.tokenizer, list(user_texts), sampling, chat_template_kwargs=self.chat_template_kwargs
        )


class SufficiencyJudge:
    """Judges (question, prefix) pairs in batches over a scoring back end (`HFScorer`, or vLLM's
    `VLLMChatBackend`), in `generate` or `logits` mode. The arguments are the `truncation.judge`
    node's (palign/schema.py: Judge documents each and holds its default); `hf` builds one over a
    Hugging Face model."""

    def __init__(
        self,
        scorer,
        tokenizer,
        prompt: JudgePrompt,
        *,
        mode: str,
        max_new_tokens: int,
        batch_size: int,
        engine: str,
        context_tokens: int,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ):
        if engine not in JUDGE_ENGINES:
            raise ValueError(f"truncation.judge.engine must be one of {JUDGE_ENGINES}, got '{engine}'")
        if mode not in JUDGE_MODES:
            raise ValueError(f"truncation.judge.mode must be one of {JUDGE_MODES}, got '{mode}'")
        self.scorer = scorer
        # a scorer without one-pass scoring (vLLM) scores each prefix as its own sequence
        self.engine = engine if getattr(scorer, "one_pass", False) else "batched"
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.mode = mode
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        # what a probe may take, prompt and reply together (see the module docstring)
        self.context_tokens = context_tokens
        self.reply_tokens = 1 if mode == "logits" else max_new_tokens
        if context_tokens <= self.reply_tokens:
            raise ValueError(
                f"truncation.judge: a context of {context_tokens} tokens leaves no room for a prompt before "
                f"the {self.reply_tokens}-token reply; raise truncation.judge.max_context_tokens or lower "
                "truncation.judge.max_new_tokens"
            )
        enough = tokenizer(prompt.enough, add_special_tokens=False)["input_ids"]
        not_enough = tokenizer(prompt.not_enough, add_special_tokens=False)["input_ids"]
        shared = common_prefix(enough, not_enough)
        if len(shared) == min(len(enough), len(not_enough)):
            raise ValueError(f"verdicts {prompt.enough!r} and {prompt.not_enough!r} must differ in a token")
        # the reply is scored after the verdicts' shared tokens (e.g. "["), at their first difference
        self.verdict_prefix = shared
        self.enough_token = enough[len(shared)]
        self.not_enough_token = not_enough[len(shared)]
        self.calls = 0

    @classmethod
    def hf(cls, model, tokenizer, prompt: JudgePrompt, **overrides: Any) -> SufficiencyJudge:
        """The judge over `model` (`HFScorer`) at the schema's `truncation.judge` defaults but
        `overrides` (mode, engine, batch_size, max_new_tokens, max_tail_tokens, chat_template_kwargs)."""
        from palign.llm.models import context_length
        from palign.schema import Judge, defaults

        chat_template_kwargs = overrides.pop("chat_template_kwargs", None)
        node = defaults(Judge, **overrides)
        settings = {name: node[name] for name in ("mode", "max_new_tokens", "batch_size", "engine", "max_tail_tokens")}
        settings["chat_template_kwargs"] = chat_template_kwargs
        settings["context_tokens"] = node["max_context_tokens"] or context_length(model)
        scorer = HFScorer(
            model,
            tokenizer,
            batch_size=settings["batch_size"],
            max_tail_tokens=settings.pop("max_tail_tokens"),
            chat_template_kwargs=settings["chat_template_kwargs"],
        )
        return cls(scorer, tokenizer, prompt, **settings)

    @classmethod
    def on_backend(cls, backend, prompt: JudgePrompt, **settings: Any) -> SufficiencyJudge:
        """The judge over a chat back end that scores (vLLM's VLLMChatBackend), with its tokenizer
        and chat template switches."""
        return cls(backend, backend.tokenizer, prompt, chat_template_kwargs=backend.chat_template_kwargs, **settings)

    def longest_fitting_prefix(self, question: str, seg: Segmentation) -> int:
        """The largest k whose probe (the prompt the judge is sent plus the reply it needs) fits
        `context_tokens`; 0 when not even one unit does. Prompt lengths grow with k, so every
        shorter prefix fits too."""
        budget = self.context_tokens - self.reply_tokens
        if self.mode == "logits":  # exactly the tokens the scorer is sent (`prefix_tokens`)
            head, pieces, tail = self.prefix_tokens(question, seg)
            used, fitting = len(head) + len(tail), 0
            for piece in pieces:
                used += len(piece)
                if used > budget:
                    break
                fitting += 1
            return fitting

        # generate mode: the rendered user turn `complete` sends, measured at O(log m) prefixes
        def length(k: int) -> int:
            return len(
                encode_user_turn(
                    self.tokenizer, render_prompt(self.prompt, question, seg.prefix(k)), self.chat_template_kwargs
                )
            )

        low, high = 0, seg.m
        while low < high:
            middle = (low + high + 1) // 2
            if length(middle) <= budget:
                low = middle
            else:
                high = middle - 1
        return low

    # -- prefix scoring (logits mode) ----------------------------------------------------------
    def prefix_tokens(self, question: str, seg: Segmentation) -> tuple[list[int], list[list[int]], list[int]]:
        """(head, per-unit pieces, tail) token ids of the judge prompt around the reasoning.

        The reasoning of prefix k is tokenized unit by unit (piece k = prefix(k) minus prefix(k-1)),
        so every unit boundary is a token boundary: the tokens of prefix k are exactly the first
        tokens of prefix m, which is what lets the one-pass engine share one forward pass.
        """
        user = self.prompt.template.replace("{question}", question).replace("{reasoning_part}", _SENTINEL)
        head_text, tail_text = render_user_turn(self.tokenizer, user, self.chat_template_kwargs).split(_SENTINEL)
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        pieces, previous = [], ""
        for k in range(1, seg.m + 1):
            current = seg.prefix(k)
            if not current.startswith(previous):
                raise ValueError(f"granularity '{seg.granularity}': prefix {k} does not extend prefix {k - 1}")
            pieces.append(encode(current[len(previous) :]))
            previous = current
        return encode(head_text), pieces, encode(tail_text) + self.verdict_prefix

    def prefix_scores(self, items: Sequence[tuple[str, Segmentation, Sequence[int]]]) -> list[dict[int, float]]:
        """Scores of the prefixes `ks` of each (question, segmentation), by the configured engine; a
        prefix whose probe does not fit the context is left out (no score, no request)."""
        items = [
            (q, seg, [k for k in ks if k <= limit])
            for q, seg, ks in items
            for limit in (self.longest_fitting_prefix(q, seg),)
        ]
        if self.engine == "one_pass":
            return [self._one_pass(*self.prefix_tokens(q, seg), ks) for q, seg, ks in items]
        return self._each_prefix_scores(items)

    def _each_prefix_scores(self, items: Sequence[tuple[str, Segmentation, Sequence[int]]]) -> list[dict[int, float]]:
        """Every requested prefix as its own sequence, all through `score_encoded` (the batched engine)."""
        flat, where = [], []
        for index, (question, seg, ks) in enumerate(items):
            head, pieces, tail = self.prefix_tokens(question, seg)
            for k in ks:
                flat.append(head + [t for piece in pieces[:k] for t in piece] + tail)
                where.append((index, k))
        out: list[dict[int, float]] = [{} for _ in items]
        for (index, k), score in zip(where, self.score_encoded(flat)):
            out[index][k] = score
        return out

    def encode(self, question: str, reasoning_part: str) -> list[int]:
        user = render_prompt(self.prompt, question, reasoning_part)
        return encode_user_turn(self.tokenizer, user, self.chat_template_kwargs) + self.verdict_prefix

    def _one_pass(
        self, head: list[int], pieces: list[list[int]], tail: list[int], ks: Sequence[int]
    ) -> dict[int, float]:
        self.calls += len(ks)
        return self.scorer.one_pass_scores(head, pieces, tail, ks, self.enough_token, self.not_enough_token)

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """log P(enough token) - log P(not-enough token) after the verdicts' shared prefix."""
        return self.score_encoded([self.encode(q, r) for q, r in pairs])

    def score_encoded(self, encoded: Sequence[Sequence[int]]) -> list[float]:
        self.calls += len(encoded)
        return self.scorer.verdict_scores(encoded, self.enough_token, self.not_enough_token)

    def generate_replies(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        self.calls += len(pairs)
        sampling = SamplingConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, repetition_penalty=1.0, batch_size=self.batch_size
        )
        outputs = self.scorer.complete([render_prompt(self.prompt, q, r) for q, r in pairs], sampling)
        return [samples[0].text for samples in outputs]

    def judge(self, pairs: Sequence[tuple[str, str]], thresholds: Sequence[float] | None = None) -> list[Verdict]:
        """Verdicts for (question, prefix) pairs; `thresholds` (one per pair) for `logits` mode."""
        if self.mode == "generate":
            return [
                Verdict(is_sufficient_reply(self.prompt, reply), None, reply) for reply in self.generate_replies(pairs)
            ]
        scores = self.score(pairs)
        thresholds = thresholds if thresholds is not None else [0.0] * len(scores)
        return [Verdict(score >= t - SCORE_TOLERANCE, score, None) for score, t in zip(scores, thresholds)]
