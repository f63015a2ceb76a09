"""Text generation on the HF backend: the method's decoding and uncertainty pass (adapters/generate.py, the same
code the offline threshold fit runs) under the backend's model lock, taken per decoding step so /predict batches
interleave with a long generation; a prompt it cannot take becomes a BackendError (422)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from adapters import generate as method
from adapters.generation import GenerateRequest, GenerateResult

from .backend import BackendError

if TYPE_CHECKING:
    from adapters.model import DalorraModel


def generate(
    model: DalorraModel,
    req: GenerateRequest,
    lock: AbstractContextManager[object],
    max_prompt_tokens: int,
    on_token: method.OnToken | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> GenerateResult:
    try:
        return method.generate(model, req, lock, max_prompt_tokens, on_token, cancelled)
    except method.PromptTooLong as exc:
        raise BackendError(f"{exc} (DALORRA_MAX_PROMPT_TOKENS)") from None
    except method.PromptError as exc:
        raise BackendError(str(exc)) from None
