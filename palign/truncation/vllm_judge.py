"""The sufficiency judge (PAPER.md §2.1) with its model on vLLM (`truncation.judge.backend: vllm`).

The engine, the forced-token logprobs that make its scores exact, and the shared engines are
`palign.llm.vllm_backend`'s; this is only the judge that asks it.
"""

from __future__ import annotations

from collections.abc import Sequence

from palign.llm.generation import SamplingConfig
from palign.llm.vllm_backend import VLLMChatBackend
from palign.truncation.judge import JudgePrompt, SufficiencyJudge
from palign.truncation.units import Segmentation


class VLLMSufficiencyJudge(SufficiencyJudge):
    """`SufficiencyJudge` with its model on vLLM: the same prompts and tokens, the same verdicts.

    Every prefix is scored as its own sequence (what the `batched` engine does); vLLM's prefix cache
    shares the question and the earlier units among them, which is what the `one_pass` engine does
    by hand. `engine` still decides which prefixes the truncation stage asks for (`one_pass`: all of
    a trace's at first touch; `batched`: only those the search probes, usually fewer).
    """

    def __init__(
        self,
        backend: VLLMChatBackend,
        prompt: JudgePrompt,
        *,
        mode: str,
        max_new_tokens: int,
        batch_size: int,
        engine: str,
    ):
        super().__init__(None, backend.tokenizer, prompt, mode=mode, chat_template_kwargs=backend.chat_template_kwargs,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, engine=engine)
        self.backend = backend

    def prefix_scores(self, items: Sequence[tuple[str, Segmentation, Sequence[int]]]) -> list[dict[int, float]]:
        return self._each_prefix_scores(items)  # whichever engine: the vLLM scorer below does every sequence

    def score_encoded(self, encoded: Sequence[Sequence[int]]) -> list[float]:
        self.calls += len(encoded)
        return self.backend.verdict_scores(encoded, self.enough_token, self.not_enough_token)

    def generate_replies(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        self.calls += len(pairs)
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, do_sample=False, repetition_penalty=1.0)
        outputs = self.backend.complete([self.prompt.render(q, r) for q, r in pairs], sampling)
        return [samples[0].text for samples in outputs]
