"""Abstain routing: use the model's answer when it is sure, otherwise ask a fallback (a bigger model, a person).

Usage:

    def ask_a_human(question, choices, prediction) -> int:
        return choices.index(input(f"{question} {choices}? "))   # the index of the chosen answer

    router = AbstainRouter(Client(url), fallback=ask_a_human)
    result = router.route("Which is a mammal?", ["whale", "shark"])
    result.answer, result.path        # "whale", "model"  (or the fallback's answer, "fallback")

The fallback gets (question, choices, the model's PredictResponse) and returns the **index** of its answer in
`choices` (the text of one of the choices is accepted too); that index is sent to /feedback as the label.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.protocol import PredictResponse

if TYPE_CHECKING:
    from .client import AsyncClient, Client

Fallback = Callable[[str, list[str], PredictResponse], "int | str | Awaitable[int | str]"]


def choice_index(answer: object, choices: list[str]) -> int:
    """The fallback's answer as an index into `choices`: an index, or the text of one of the choices."""
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    raise ValueError(
        f"the fallback returned {answer!r}; it must return the index (0 to {len(choices) - 1}) of its answer in "
        f"choices, or the text of one of them: {choices}"
    )


@dataclass
class Routed:
    answer: str
    answer_index: int
    path: str  # "model" or "fallback"
    prediction: PredictResponse
    feedback_sent: bool = False


class AbstainRouter:
    """Sync router over `clients.client.Client`. The fallback returns the index of its chosen answer (or its text)."""

    def __init__(
        self,
        client: Client,
        fallback: Callable[[str, list[str], PredictResponse], int | str],
        send_feedback: bool = True,
        **predict_kw,
    ):
        self.client, self.fallback, self.send_feedback = client, fallback, send_feedback
        self.predict_kw = predict_kw
        self.counts: Counter[str] = Counter()

    def route(self, question: str, choices: list[str]) -> Routed:
        pred = self.client.predict(question, choices, **self.predict_kw)
        if pred.decision == "answer":
            self.counts["model"] += 1
            return Routed(pred.answer, pred.answer_index, "model", pred)
        k = choice_index(self.fallback(question, choices, pred), choices)
        self.counts["fallback"] += 1
        sent = False
        if self.send_feedback:  # the fallback's answer is a label for the model's prediction
            self.client.feedback(pred.receipt, k)
            sent = True
        return Routed(choices[k], k, "fallback", pred, sent)

    def record_truth(self, routed: Routed, label: int) -> None:
        """When the true answer becomes known later (e.g. a user confirms it), send it as feedback."""
        if not routed.feedback_sent:
            self.client.feedback(routed.prediction.receipt, label)
            routed.feedback_sent = True


class AsyncAbstainRouter:
    """Async router over `clients.client.AsyncClient`; the fallback may be sync or async."""

    def __init__(self, client: AsyncClient, fallback: Fallback, send_feedback: bool = True, **predict_kw):
        self.client, self.fallback, self.send_feedback = client, fallback, send_feedback
        self.predict_kw = predict_kw
        self.counts: Counter[str] = Counter()

    async def route(self, question: str, choices: list[str]) -> Routed:
        pred = await self.client.predict(question, choices, **self.predict_kw)
        if pred.decision == "answer":
            self.counts["model"] += 1
            return Routed(pred.answer, pred.answer_index, "model", pred)
        k = self.fallback(question, choices, pred)
        if inspect.isawaitable(k):
            k = await k
        k = choice_index(k, choices)
        self.counts["fallback"] += 1
        if self.send_feedback:
            await self.client.feedback(pred.receipt, k)
        return Routed(choices[k], k, "fallback", pred, self.send_feedback)
