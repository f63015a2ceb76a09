"""A backend with no model, for fast tests of the batcher and the service.

Logits are a pure function of the request (so a test can compute every answer by hand), and the test steers
failures by the question text: "bad …" → that request's own BackendError, "type-error …" → that request's own
TypeError (an unexpected error), "crash …" → the whole call raises. `gate` holds every call until it is set;
`short` makes the next call return one result too few.
"""

from __future__ import annotations

import threading

import numpy as np

from server.backend import Backend, BackendError, ScoreRequest


def logits_for(req: ScoreRequest) -> np.ndarray:
    """(S, K): sample s, choice k → a value from (question length, seed, first + s, k): distinct per request."""
    s = np.arange(req.first, req.first + req.samples)[:, None]
    k = np.arange(len(req.choices))[None, :]
    return np.sin(0.7 * len(req.question) + 1.3 * req.seed + 0.9 * s + 2.1 * k) * 3.0


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, record: dict | None = None):
        self.record = record or {"method": "dalorra", "default_samples": 4}
        self.loaded: set[str] = set()
        self.calls: list[list[ScoreRequest]] = []  # every score() call's requests, in order
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()  # as the HF backend: scoring and unloading never overlap
        self.short = False
        self.entered = threading.Event()  # set once a score() call has started

    def load_adapter(self, name: str, path: str) -> dict:
        with self.lock:
            self.loaded.add(name)
        return dict(self.record)

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self.loaded.discard(name)

    def adapter_names(self) -> list[str]:
        return sorted(self.loaded)

    def score(self, requests: list[ScoreRequest]) -> list:
        with self.lock:
            self.calls.append(list(requests))
            self.entered.set()
            if not self.gate.wait(timeout=30):
                raise RuntimeError("test gate never opened")
            if any(r.question.startswith("crash") for r in requests):
                raise RuntimeError("the whole backend call failed")
            out = []
            for r in requests:
                if r.adapter not in self.loaded:
                    out.append(BackendError(f"adapter {r.adapter!r} is not loaded"))
                elif r.question.startswith("bad"):
                    out.append(BackendError(f"cannot score {r.question!r}"))
                elif r.question.startswith("type-error"):
                    out.append(TypeError("an unexpected error inside the backend"))
                else:
                    out.append(logits_for(r))
            if self.short:
                self.short = False
                out = out[:-1]
            return out
