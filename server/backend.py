"""The one backend interface. Routes and the batcher use only this; torch and vllm live in the backends."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from adapters.generate import OnToken

    from .generation import GenerateRequest, GenerateResult


@dataclass(frozen=True)
class ScoreRequest:
    adapter: str
    question: str
    choices: tuple[str, ...]
    context: str | None
    samples: int
    seed: int
    first: int = 0  # sample index of the first draw: adaptive rounds continue where the last one stopped

    @property
    def rows(self) -> int:
        return self.samples


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of a prompt's own tokens under one network (OpenAI's `echo` with `logprobs`).

    Position t holds log p(x_t | x_<t); the first token has none (nothing predicts it), so its entries are None."""

    tokens: list[str]  # each token's text, as generation reports tokens (decode of the one id)
    token_logprobs: list[float | None]  # (L,)
    top_logprobs: list[list[tuple[str, float]] | None]  # (L,) the k most likely tokens at each position
    network: str  # which network computed them (README "OpenAI-compatible API")


class BackendError(RuntimeError):
    """A request the backend cannot score (e.g. too long for the model); maps to a 4xx."""


class Backend(abc.ABC):
    name = "abstract"

    @abc.abstractmethod
    def load_adapter(self, name: str, path: str) -> dict:
        """Load an adapter directory under `name`; returns its JSON record. Raises on a bad adapter."""

    @abc.abstractmethod
    def unload_adapter(self, name: str) -> None: ...

    @abc.abstractmethod
    def adapter_names(self) -> list[str]: ...

    @abc.abstractmethod
    def score(self, requests: list[ScoreRequest]) -> list[Scored | Exception]:
        """A Scored ((S_i, K_i) choice logits) for every request, in order, or that request's own exception.

        Requests may name different adapters; a backend scores them in as few forwards as it can."""

    def generate(
        self,
        request: GenerateRequest,
        on_token: OnToken | None = None,
        cancelled: Callable[[], bool] | None = None,
        gate: Callable[[int], AbstractContextManager[object]] | None = None,
    ) -> GenerateResult:
        """Decode a GenerateRequest with the mean-mask network and score the answer under S masks
        (server/generation.py); returns a GenerateResult. Every use of the model runs inside gate(rows), the
        scheduler's turn for a piece of `rows` rows. A backend that cannot raises GenerationUnsupported."""
        from .generation import GenerationUnsupported

        raise GenerationUnsupported(f"the {self.name} backend cannot generate text")

    def prompt_logprobs(
        self,
        adapter: str,
        token_ids: Sequence[int],
        top_k: int,
        gate: Callable[[int], AbstractContextManager[object]] | None = None,
    ) -> PromptLogprobs:
        """Log-probabilities of every token of `token_ids` given the ones before it, with the `top_k` most likely
        alternatives, under the adapter's mean-mask network (z = E[z], the network that decodes generated text).
        The forward runs inside gate(rows), the scheduler's turn. Raises BackendError for ids outside the
        vocabulary or a prompt over the token limit; a backend that cannot raises GenerationUnsupported."""
        from .generation import GenerationUnsupported

        raise GenerationUnsupported(
            f"the {self.name} backend cannot score prompt tokens (echo with logprobs)"
        )

    def tokenizer(self, adapter: str) -> Any | None:
        """The adapter's tokenizer (a Hugging Face tokenizer: encode, decode, eos_token, chat_template), or None
        when this backend does not expose one. Token-ID prompts, /tokenize and token counts use it."""
        return None

    def ready(self) -> bool:
        return True

    def shutdown(self) -> None:
        return None


@dataclass(frozen=True)
class Scored:
    """A backend's answer for one request when it knows more than the logits."""

    logits: np.ndarray  # (S, K)
    choice_mass: float | None = (
        None  # probability the unrestricted next-token distribution put on the K choices
    )
