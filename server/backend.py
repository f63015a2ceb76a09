"""The one backend interface. Routes and the batcher use only this; torch and vllm live in the backends."""

from __future__ import annotations

import abc
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
