"""server/scheduler.py on a fake backend (no model): every accepted request gets exactly its own outcome."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from server.backend import BackendError, Scored, ScoreRequest
from server.scheduler import BatchFailed, Overloaded, Scheduler, ShuttingDown
from tests.fake_backend import FakeBackend, logits_for


def req(question: str, samples: int = 2, seed: int = 0, choices=("yes", "no", "maybe")) -> ScoreRequest:
    return ScoreRequest("fake", question, tuple(choices), None, samples, seed)


def run(coro_fn, **batcher_kw):
    """Run `coro_fn(batcher, backend)` on a started batcher; always opens the gate and closes the batcher."""

    async def main():
        backend = FakeBackend()
        backend.loaded.add("fake")
        kw = {"max_batch_rows": 64, "max_wait_ms": 50, "max_queue_rows": 1000, **batcher_kw}
        b = Scheduler(
            backend, kw.pop("max_batch_rows"), kw.pop("max_wait_ms"), kw.pop("max_queue_rows"), **kw
        )
        b.start()
        try:
            return await asyncio.wait_for(coro_fn(b, backend), 20)
        finally:
            backend.gate.set()
            await b.close()

    return asyncio.run(main())


def same(got: Scored, r: ScoreRequest) -> None:
    """The scheduler answers a Scored holding exactly the backend's logits for this request."""
    assert isinstance(got, Scored)
    np.testing.assert_array_equal(got.logits, logits_for(r))


def questions(call) -> list[str]:
    return [r.question for r in call]


def test_each_request_gets_its_own_logits_from_one_backend_call():
    batches = []

    async def body(b, backend):
        rs = [req(f"q{'?' * i}", samples=1 + i % 3, seed=i) for i in range(6)]
        got = await asyncio.gather(*(b.submit(r) for r in rs))
        for r, g in zip(rs, got, strict=True):
            same(g, r)
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
        same(got[0], req("good one"))
        assert isinstance(got[1], BackendError) and "bad one" in str(got[1])
        same(got[2], req("good two"))

    run(body)


def test_a_failed_call_fails_its_batch_and_the_next_batch_is_served():
    async def body(b, backend):
        got = await asyncio.gather(
            b.submit(req("crash now")), b.submit(req("innocent")), return_exceptions=True
        )
        assert all(isinstance(g, BatchFailed) and "whole backend call" in str(g) for g in got)
        later = await b.submit(req("later"))
        same(later, req("later"))
        assert b.queued_rows == 0

    run(body)


def test_count_check_fails_the_batch_instead_of_misrouting_results():
    async def body(b, backend):
        backend.short = True  # the next call returns one result too few
        got = await asyncio.gather(b.submit(req("a")), b.submit(req("bb")), return_exceptions=True)
        assert len(backend.calls) == 1
        for g in got:  # never a's logits handed to bb: both fail, saying why
            assert isinstance(g, RuntimeError) and "returned 1 results for 2 requests" in str(g)
        same(await b.submit(req("ccc")), req("ccc"))

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
            same(g, r)
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
        same(await first, req("first"))
        same(await b.submit(req("after")), req("after"))
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
        same(await b.submit(req("room again", samples=5)), req("room again", 5))

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
        same(accepted.result(), req("accepted"))

    run(body)


def areq(adapter: str, question: str, samples: int = 2) -> ScoreRequest:
    return ScoreRequest(adapter, question, ("yes", "no"), None, samples, 0)


def test_batches_take_adapters_in_turn_so_a_busy_one_cannot_starve_the_others():
    async def body(b, backend):
        backend.loaded.update({"busy", "quiet"})
        backend.gate.clear()
        first = asyncio.ensure_future(b.submit(areq("busy", "b0", 4)))
        while not backend.entered.is_set():
            await asyncio.sleep(0.01)
        flood = [asyncio.ensure_future(b.submit(areq("busy", f"b{i}", 4))) for i in range(1, 7)]
        await asyncio.sleep(0.02)
        quiet = asyncio.ensure_future(b.submit(areq("quiet", "q1", 4)))  # arrives after the flood
        await asyncio.sleep(0.02)
        backend.gate.set()
        await asyncio.gather(first, quiet, *flood)
        second = questions(backend.calls[1])
        assert "q1" in second  # served in the first batch after it arrived, beside the busy adapter
        assert second[:2] == ["b1", "q1"]  # one request per adapter in turn

    run(body, max_batch_rows=8, max_wait_ms=0)


def test_a_generation_piece_takes_its_turn_between_batches():
    """gate(rows) from a worker thread: the thread holds the model for its block, and a batch queued meanwhile
    runs after it; pieces and batches alternate when both wait."""

    async def body(b, backend):
        order: list[str] = []
        inside = asyncio.Event()
        loop = asyncio.get_running_loop()
        release = threading.Event()

        def piece() -> None:
            with b.gate(5):
                order.append("piece start")
                loop.call_soon_threadsafe(inside.set)
                release.wait(5)
                order.append("piece end")

        th = threading.Thread(target=piece)
        th.start()
        await inside.wait()
        scored = asyncio.ensure_future(b.submit(req("waits for the piece")))
        await asyncio.sleep(0.05)
        assert not backend.calls  # the batch did not run while the piece held the model
        release.set()
        await scored
        order.append("batch done")
        th.join(5)
        assert order == ["piece start", "piece end", "batch done"]
        assert b.turns_run == 1 and b.queued_rows == 0

    run(body, max_wait_ms=0)


def test_closing_refuses_waiting_pieces_instead_of_leaving_threads_hanging():
    async def body(b, backend):
        backend.gate.clear()
        busy = asyncio.ensure_future(b.submit(req("holds the backend")))
        while not backend.entered.is_set():
            await asyncio.sleep(0.01)
        errors: list[BaseException] = []

        def piece() -> None:
            try:
                with b.gate(1):
                    pass
            except BaseException as exc:
                errors.append(exc)

        th = threading.Thread(target=piece)
        th.start()
        while not b.turns:
            await asyncio.sleep(0.01)
        await b.close()
        th.join(5)
        assert not th.is_alive() and isinstance(errors[0], ShuttingDown)
        backend.gate.set()
        busy.cancel()

    run(body, max_wait_ms=0)
