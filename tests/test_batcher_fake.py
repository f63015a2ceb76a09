"""server/batcher.py on a fake backend (no model): every accepted request gets exactly its own outcome."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.backend import BackendError, ScoreRequest
from server.batcher import Batcher, Overloaded, ShuttingDown
from tests.fake_backend import FakeBackend, logits_for


def req(question: str, samples: int = 2, seed: int = 0, choices=("yes", "no", "maybe")) -> ScoreRequest:
    return ScoreRequest("fake", question, tuple(choices), None, samples, seed)


def run(coro_fn, **batcher_kw):
    """Run `coro_fn(batcher, backend)` on a started batcher; always opens the gate and closes the batcher."""

    async def main():
        backend = FakeBackend()
        backend.loaded.add("fake")
        kw = {"max_batch_rows": 64, "max_wait_ms": 50, "max_queue_rows": 1000, **batcher_kw}
        b = Batcher(backend, kw.pop("max_batch_rows"), kw.pop("max_wait_ms"), kw.pop("max_queue_rows"), **kw)
        b.start()
        try:
            return await asyncio.wait_for(coro_fn(b, backend), 20)
        finally:
            backend.gate.set()
            await b.close()

    return asyncio.run(main())


def questions(call) -> list[str]:
    return [r.question for r in call]


def test_each_request_gets_its_own_logits_from_one_backend_call():
    batches = []

    async def body(b, backend):
        rs = [req(f"q{'?' * i}", samples=1 + i % 3, seed=i) for i in range(6)]
        got = await asyncio.gather(*(b.submit(r) for r in rs))
        for r, g in zip(rs, got, strict=True):
            np.testing.assert_array_equal(g, logits_for(r))
        assert len(backend.calls) == 1 and questions(backend.calls[0]) == [r.question for r in rs]
        assert b.queued_rows == 0

    run(body, on_batch=lambda n, rows, dt: batches.append((n, rows)))
    assert batches == [(6, sum(1 + i % 3 for i in range(6)))]


def test_a_bad_request_fails_alone_in_a_shared_batch():
    async def body(b, backend):
        got = await asyncio.gather(
            b.submit(req("good one")),
            b.submit(req("bad one")),
            b.submit(req("good two")),
            return_exceptions=True,
        )
        assert len(backend.calls) == 1  # all three went through one call, so isolation is really tested
        np.testing.assert_array_equal(got[0], logits_for(req("good one")))
        assert isinstance(got[1], BackendError) and "bad one" in str(got[1])
        np.testing.assert_array_equal(got[2], logits_for(req("good two")))

    run(body)


def test_a_failed_call_fails_its_batch_and_the_next_batch_is_served():
    async def body(b, backend):
        got = await asyncio.gather(
            b.submit(req("crash now")), b.submit(req("innocent")), return_exceptions=True
        )
        assert all(isinstance(g, RuntimeError) and "whole backend call" in str(g) for g in got)
        later = await b.submit(req("later"))
        np.testing.assert_array_equal(later, logits_for(req("later")))
        assert b.queued_rows == 0

    run(body)


def test_count_check_fails_the_batch_instead_of_misrouting_results():
    async def body(b, backend):
        backend.short = True  # the next call returns one result too few
        got = await asyncio.gather(b.submit(req("a")), b.submit(req("bb")), return_exceptions=True)
        assert len(backend.calls) == 1
        for g in got:  # never a's logits handed to bb: both fail, saying why
            assert isinstance(g, RuntimeError) and "returned 1 results for 2 requests" in str(g)
        np.testing.assert_array_equal(await b.submit(req("ccc")), logits_for(req("ccc")))

    run(body)


def test_a_request_that_does_not_fit_is_carried_to_the_next_batch():
    async def body(b, backend):
        rs = [
            req("six a", samples=6),
            req("six b", samples=6),
            req("three", samples=3),
            req("fifteen", samples=15),
            req("one", samples=1),
        ]
        got = await asyncio.gather(*(b.submit(r) for r in rs))
        for r, g in zip(rs, got, strict=True):
            np.testing.assert_array_equal(g, logits_for(r))
        # 6 + 6 > 10: "six b" waits and opens the next batch; a 15-row request goes alone; nothing is dropped.
        assert [questions(c) for c in backend.calls] == [["six a"], ["six b", "three"], ["fifteen"], ["one"]]
        assert all(sum(r.rows for r in c) <= 10 for c in backend.calls if len(c) > 1)

    run(body, max_batch_rows=10)


def test_a_timed_out_request_is_not_scored_and_frees_its_rows():
    async def body(b, backend):
        backend.gate.clear()
        first = asyncio.ensure_future(b.submit(req("first")))
        while not backend.entered.is_set():  # the first batch is in the backend, held at the gate
            await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.submit(req("late", samples=5)), 0.2)  # the caller's deadline passes
        backend.gate.set()
        np.testing.assert_array_equal(await first, logits_for(req("first")))
        np.testing.assert_array_equal(await b.submit(req("after")), logits_for(req("after")))
        assert [questions(c) for c in backend.calls] == [["first"], ["after"]]  # "late" never reached it
        assert b.queued_rows == 0

    run(body)


def test_a_full_queue_refuses_with_retry_after_and_recovers():
    async def body(b, backend):
        backend.gate.clear()
        first = asyncio.ensure_future(b.submit(req("first", samples=2)))
        while not backend.entered.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(b.submit(req("queued", samples=8)))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as exc:
            await b.submit(req("one too many", samples=5))  # 8 queued + 5 > 10 rows
        assert exc.value.retry_after >= 1
        backend.gate.set()
        await asyncio.gather(first, queued)
        np.testing.assert_array_equal(
            await b.submit(req("room again", samples=5)), logits_for(req("room again", 5))
        )

    run(body, max_queue_rows=10, max_batch_rows=8)


def test_drain_answers_accepted_work_then_refuses_new_work():
    async def body(b, backend):
        backend.gate.clear()
        accepted = asyncio.ensure_future(b.submit(req("accepted")))
        while not backend.entered.is_set():
            await asyncio.sleep(0.01)
        drain = asyncio.ensure_future(b.drain(timeout=10))
        await asyncio.sleep(0.05)
        with pytest.raises(ShuttingDown):
            await b.submit(req("too late"))
        assert not drain.done()  # still waiting for the accepted request
        backend.gate.set()
        await drain
        np.testing.assert_array_equal(accepted.result(), logits_for(req("accepted")))

    run(body)
