"""`backend: hf`: palign's batched Hugging Face generation in this process (any model, any device).

`LocalChatBackend` is the `ChatBackend` (palign/llm/backends.py) of a Hugging Face model loaded on
first use; `HFBackend` is the option (conf/backend/hf.yaml) that builds it for a stage. The judge's
logits mode does not go through `complete`: palign/truncation/prefixes.py scores with the loaded
model itself (`LocalChatBackend.model`, one forward per trace).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from palign.llm.backends import Backend
from palign.llm.generation import Generation, SamplingConfig, generate
from palign.llm.models import ModelSpec, load_inference_model


class LocalChatBackend:
    """A local Hugging Face model; loaded on the first `complete`, then kept."""

    def __init__(
        self,
        model_loader: Callable[[], Any],
        tokenizer,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        identity: Mapping[str, Any] | None = None,
    ):
        self.model_loader = model_loader
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._identity = dict(identity) if identity is not None else {"tokenizer": tokenizer.name_or_path}
        self._model = None

    def model(self):
        """The model, loaded on the first call."""
        if self._model is None:
            self._model = self.model_loader()
        return self._model

    def complete(
        self, user_texts: Sequence[str], sampling: SamplingConfig | Mapping[str, Any], progress: str | None = None
    ) -> list[list[Generation]]:
        return generate(self.model(), self.tokenizer, user_texts, sampling, self.chat_template_kwargs, progress)

    def identity(self) -> dict[str, Any]:
        return {"backend": "local", **self._identity}

    def __repr__(self) -> str:
        return f"LocalChatBackend({self._identity.get('name', self.tokenizer.name_or_path)!r})"


class HFBackend(Backend):
    """`backend: hf` (conf/backend/hf.yaml): the stage's model (its trained `weights` where given)
    loaded in this process on its `device`, when the stage first has work."""

    def chat(self, model: ModelSpec, cache_dir: Any, *, tokenizer, weights: str | None, stage: str) -> LocalChatBackend:
        return LocalChatBackend(
            partial(load_inference_model, model, cache_dir, path=weights),
            tokenizer,
            model.chat_template_kwargs,
            identity=model.identity(),
        )
