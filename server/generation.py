"""Generated answers: the backend contract. A backend's `generate` takes a GenerateRequest and returns a
GenerateResult, or raises GenerationUnsupported. The types (and the uncertainty math over them) are the method's,
in adapters/generation.py, shared with the offline fit of the generation thresholds; they are re-exported here
under the server's name for the contract."""

from __future__ import annotations

from adapters.generation import GeneratedChoice, GenerateRequest, GenerateResult, TokenScores

__all__ = ["GeneratedChoice", "GenerateRequest", "GenerateResult", "GenerationUnsupported", "TokenScores"]


class GenerationUnsupported(RuntimeError):
    """The backend cannot do this (maps to 501 with the reason)."""
