"""Dynamic batching: queue → gather up to a row budget or a wait limit → one backend call → per-request results.

Plain asyncio; the backend runs in one worker thread so the event loop keeps accepting requests.
Every accepted request gets exactly one outcome: its logits, its own error, or a timeout.

Admission keeps 429 honest: a request is admitted only if the rows already admitted plus its own can be scored
before its deadline at the measured drain rate (seconds per row, a moving average over backend calls);
otherwise it is refused at once with a Retry-After from the same estimate, instead of timing out later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .backend import Backend, Scored, ScoreRequest

if TYPE_CHECKING:
    import numpy as np


class Overloaded(Exception):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"server overloaded; retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining and accepts no new work."""


@dataclass
class _Pending:
    req: ScoreRequest
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        backend: Backend,
        max_batch_rows: int,
        max_wait_ms: float,
        max_queue_rows: int,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ):
        self.backend = backend
        self.max_batch_rows, self.max_wait = max_batch_rows, max_wait_ms / 1000
        self.max_queue_rows = max_queue_rows
        self.on_batch, self.on_queue = on_batch, on_queue
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.queued_rows = 0
        self.inflight = 0
        self.batches = 0
        self.closing = False
        self.admitted_rows = 0  # rows of admitted requests not yet answered (queued, scoring, between rounds)
        self.row_seconds: float | None = None  # measured backend seconds per row (EMA); None until a call ran
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dalorra-backend")
        self._task: asyncio.Task | None = None
        self._carry: _Pending | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def admit(self, rows: int, deadline_s: float | None = None) -> None:
        """Reserve `rows` for a whole request, or raise Overloaded: when the queue bound would be passed, or
        when the admitted backlog plus these rows cannot be scored within `deadline_s` at the measured rate.
        Until one backend call has been measured, at most one batch of rows is admitted. release() frees them."""
        if self.closing:
            raise ShuttingDown("server is shutting down")
        backlog = self.admitted_rows + rows
        if self.row_seconds is None:
            limit = (
                self.max_queue_rows if deadline_s is None else min(self.max_queue_rows, self.max_batch_rows)
            )
            per_row = 0.0
        else:
            per_row = self.row_seconds
            fits = int(deadline_s / per_row) if deadline_s is not None else self.max_queue_rows
            limit = min(self.max_queue_rows, fits)
        if backlog > limit and self.admitted_rows > 0:  # an idle server always takes one request
            # Retry-After: the time until enough of the backlog has drained for these rows to fit.
            raise Overloaded(max(1.0, (backlog - limit) * per_row))
        self.admitted_rows = backlog

    def release(self, rows: int) -> None:
        self.admitted_rows = max(0, self.admitted_rows - rows)

    async def submit(self, req: ScoreRequest, admitted: bool = False) -> np.ndarray | Scored:
        """Queue one request; returns its (S, K) logits or raises its own error.

        admitted=True: its rows were reserved by admit() (the caller releases them); otherwise they are
        reserved here and released when it is answered."""
        if not admitted:
            self.admit(req.rows)
            try:
                return await self.submit(req, admitted=True)
            finally:
                self.release(req.rows)
        fut = asyncio.get_running_loop().create_future()
        self.queued_rows += req.rows
        self._report_queue()
        await self.queue.put(_Pending(req, fut))
        return await fut

    def _report_queue(self) -> None:
        if self.on_queue:
            self.on_queue(self.queued_rows)

    async def _gather(self) -> list[_Pending]:
        if self._carry is not None:
            first, self._carry = self._carry, None  # the request that did not fit last time goes first
        else:
            first = await self.queue.get()
        batch, rows = [first], first.req.rows
        deadline = time.perf_counter() + self.max_wait
        while rows < self.max_batch_rows:
            timeout = deadline - time.perf_counter()
            try:
                nxt = (
                    self.queue.get_nowait()
                    if timeout <= 0
                    else await asyncio.wait_for(self.queue.get(), timeout)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if rows + nxt.req.rows > self.max_batch_rows:
                self._carry = nxt  # starts the next batch; never dropped
                break
            batch.append(nxt)
            rows += nxt.req.rows
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [p for p in batch if not p.future.done()]  # a timed-out caller's work is skipped
            rows = sum(p.req.rows for p in batch)
            self.queued_rows -= rows
            self._report_queue()
            if not live:
                continue
            self.inflight += len(live)
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._pool, self.backend.score, [p.req for p in live])
                if len(results) != len(live):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(live)} requests")
            except Exception as exc:  # the whole call failed: every request gets the error
                results = [exc] * len(live)
            dt = time.perf_counter() - t0
            per_row = dt / max(1, sum(p.req.rows for p in live))
            self.row_seconds = per_row if self.row_seconds is None else 0.7 * self.row_seconds + 0.3 * per_row
            self.batches += 1
            if self.on_batch:
                self.on_batch(len(live), sum(p.req.rows for p in live), dt)
            for p, res in zip(live, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(res, Exception):
                    p.future.set_exception(res)
                else:
                    p.future.set_result(res)
            self.inflight -= len(live)

    async def drain(self, timeout: float) -> None:
        """Stop accepting; wait until queued and in-flight work is answered (or timeout)."""
        self.closing = True
        end = time.perf_counter() + timeout
        while (self.queued_rows > 0 or self.inflight > 0) and time.perf_counter() < end:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
