"""server/service.py on a fake backend (no model): the reduction to probabilities, the deadline, a backend
error that fails its request alone, and the seeded-result cache. (Issue 16's isolation and unload behaviour:
tests/test_service_isolation_fake.py.)"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.backend import ScoreRequest
from server.errors import ApiError
from server.metrics import Metrics
from server.protocol import PredictItem
from server.service import Service
from server.settings import Settings
from tests.fake_backend import FakeBackend, logits_for

CHOICES = ["red", "green", "blue"]


def make_settings(tmp_path, **kw) -> Settings:
    for name in ("fake", "other"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "adapter_config.json").write_text("{}")
    base = {
        "adapters_dir": tmp_path,
        "default_adapter": "fake",
        "preload": ["other"],
        "max_wait_ms": 50.0,
        "request_timeout_s": 10.0,
        "feedback_key": "a-test-only-feedback-key-0123",
    }
    return Settings(**{**base, **kw})


def run(tmp_path, body, record: dict | None = None, **settings_kw):
    """Run `body(service, backend, metrics)` on a started Service; always opens the gate and stops it."""

    async def main():
        backend, metrics = FakeBackend(record), Metrics()
        service = Service(make_settings(tmp_path, **settings_kw), backend, metrics)
        await service.start()
        assert len(backend.calls) == 1  # start measured the scoring rate with one small call
        backend.calls.clear()
        try:
            return await asyncio.wait_for(body(service, backend, metrics), 30)
        finally:
            backend.gate.set()
            await service.stop(drain_s=5)

    return asyncio.run(main())


def item(question: str, **kw) -> PredictItem:
    return PredictItem(question=question, choices=CHOICES, **{"samples": 3, "seed": 7, **kw})


def mean_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).mean(0)


def count(metrics: Metrics, outcome: str, adapter: str = "fake") -> float:
    return (
        metrics.registry.get_sample_value("dalorra_requests_total", {"adapter": adapter, "outcome": outcome})
        or 0.0
    )


def test_probabilities_are_the_mean_of_tempered_softmaxes(tmp_path):
    async def body(service, backend, metrics):
        out = await service.predict([item("Which colour is the sky?"), item("Grass?", seed=8, samples=5)])
        for o, (q, seed, s) in zip(out, [("Which colour is the sky?", 7, 3), ("Grass?", 8, 5)], strict=True):
            raw = logits_for(ScoreRequest("fake", q, tuple(CHOICES), None, s, seed))
            p = mean_softmax(raw / 2.0)  # the adapter's temperature divides every sample's logits
            np.testing.assert_allclose(o.probabilities, p, rtol=1e-9)
            assert o.answer_index == int(p.argmax()) and o.answer == CHOICES[o.answer_index]
            assert o.samples == s and o.confidence == pytest.approx(p.max())
        assert count(metrics, "ok") == 2

    run(tmp_path, body, record={"method": "dalorra", "default_samples": 4, "temperature": 2.0})


def test_a_backend_error_fails_its_request_alone(tmp_path):
    async def body(service, backend, metrics):
        got = await asyncio.gather(
            service.predict([item("good question")]),
            service.predict([item("bad question")]),
            service.predict([item("another good one")]),
            return_exceptions=True,
        )
        assert len(backend.calls) == 1  # one shared backend call: the isolation is real
        assert got[0][0].answer in CHOICES and got[2][0].answer in CHOICES
        assert isinstance(got[1], ApiError) and got[1].status == 422 and "bad question" in got[1].message
        assert count(metrics, "ok") == 2

    run(tmp_path, body)


def test_deadline_answers_504_then_the_server_recovers(tmp_path):
    async def body(service, backend, metrics):
        backend.gate.clear()
        with pytest.raises(ApiError) as exc:
            await service.predict([item("slow question")])
        assert exc.value.status == 504 and exc.value.type == "timeout"
        assert count(metrics, "timeout") == 1
        backend.gate.set()
        out = await service.predict([item("quick question")])
        assert out[0].answer in CHOICES
        await asyncio.sleep(0.1)
        assert service.scheduler.queued_rows == 0  # the timed-out request's rows were given back

    run(tmp_path, body, request_timeout_s=0.5)


def test_seeded_results_are_cached_and_fresh_ones_are_not(tmp_path):
    async def body(service, backend, metrics):
        a = await service.predict([item("cache me")])
        b = await service.predict([item("cache me")])
        assert a[0].probabilities == b[0].probabilities and len(backend.calls) == 1
        await service.predict([item("cache me", seed=None, fresh=True)])
        await service.predict([item("cache me", seed=None, fresh=True)])
        assert len(backend.calls) == 3

    run(tmp_path, body)
