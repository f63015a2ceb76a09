"""Issue 16 behaviour of server/service.py on a fake backend: a failure is that request's own, in the one
ApiError shape (an unexpected error or a wrong result count is a 500, never an untyped exception or a
misrouted answer), and unloading runs off the event loop while admitted requests finish."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from server.errors import ApiError
from server.metrics import Metrics
from server.service import Service
from tests.fake_backend import FakeBackend
from tests.test_service_fake import CHOICES, count, item, make_settings, run


def test_an_unexpected_error_is_a_500_for_that_request_only(tmp_path):
    """Issue 16 item 1: any exception while scoring one request fails that request only, as a 500 ApiError."""

    async def body(service, backend, metrics):
        got = await asyncio.gather(
            service.predict([item("good question")]),
            service.predict([item("type-error question")]),
            service.predict([item("another good one")]),
            return_exceptions=True,
        )
        assert len(backend.calls) == 1
        assert got[0][0].answer in CHOICES and got[2][0].answer in CHOICES
        assert isinstance(got[1], ApiError) and got[1].status == 500, repr(got[1])
        assert count(metrics, "ok") == 2

    run(tmp_path, body)


def test_a_wrong_result_count_is_an_error_for_the_batch_never_a_misrouted_answer(tmp_path):
    async def body(service, backend, metrics):
        backend.short = True
        got = await asyncio.gather(
            service.predict([item("first of two")]),
            service.predict([item("second of two")]),
            return_exceptions=True,
        )
        assert len(backend.calls) == 1
        for g in got:
            assert isinstance(g, ApiError) and g.status == 500, repr(g)
        out = await service.predict([item("next one")])
        assert out[0].answer in CHOICES

    run(tmp_path, body)


def test_unload_keeps_the_event_loop_free_and_lets_admitted_requests_finish(tmp_path):
    """Issue 16 D2: unloading waited on the event loop for the backend lock held by a running batch."""

    async def body(service, backend, metrics):
        backend.gate.clear()
        safety = threading.Timer(5.0, backend.gate.set)  # opens the gate even if the loop is stuck
        safety.start()
        try:
            admitted = asyncio.ensure_future(service.predict([item("admitted before the unload")]))
            while not backend.entered.is_set():
                await asyncio.sleep(0.01)
            unload = asyncio.ensure_future(service.registry.unload("fake"))
            await asyncio.sleep(0.3)
            # The loop ran this line while the batch still held the backend: the unload did not block it.
            assert not backend.gate.is_set(), "the event loop was blocked until the batch finished"
            assert not unload.done()
            with pytest.raises(ApiError) as exc:  # new work for the adapter is refused at once
                await service.predict([item("after the unload began")])
            assert exc.value.status == 404
            backend.gate.set()
            out = await admitted  # admitted before the unload: answered, not failed
            assert out[0].answer in CHOICES
            await unload
            assert "fake" not in backend.loaded and "other" in backend.loaded
        finally:
            safety.cancel()

    run(tmp_path, body)


def test_a_backend_failure_mid_batch_fails_only_that_batch_with_a_5xx_that_says_so(tmp_path):
    """Issue 28 item 3: an exception inside the backend (simulated by the fake's "crash" question) fails the
    requests of that one batch with a 500 naming the backend failure; the server keeps serving."""

    async def body(service, backend, metrics):
        got = await asyncio.gather(
            service.predict([item("crash in the backend")]),
            service.predict([item("innocent bystander")]),
            return_exceptions=True,
        )
        assert len(backend.calls) == 1  # both were in the failed call
        for g in got:
            assert isinstance(g, ApiError) and g.status == 500 and g.type == "backend_failed", repr(g)
            assert "backend failed on the batch" in g.message and "retry" in g.message
        assert count(metrics, "error") == 2
        out = await service.predict([item("the next batch")])
        assert out[0].answer in CHOICES

    run(tmp_path, body)


def test_a_corrupt_adapter_at_start_is_skipped_and_the_others_serve(tmp_path):
    """Issue 28 item 3: a corrupt adapter in the preload list is logged and skipped, not a failed start."""

    class Strict(FakeBackend):
        def load_adapter(self, name: str, path: str) -> dict:
            json.loads((Path(path) / "adapter_config.json").read_text())  # a corrupt file raises here
            return super().load_adapter(name, path)

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")

    async def main():
        backend = Strict()
        service = Service(make_settings(tmp_path, preload=["broken", "other"]), backend, Metrics())
        await service.start()
        try:
            assert service.ready() and service.registry.names() == ["fake", "other"]
            out = await service.predict([item("still served?")])
            assert out[0].answer in CHOICES
        finally:
            await service.stop()

    asyncio.run(main())
