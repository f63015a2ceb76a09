"""Dynamic batching: queue → gather up to a row budget or a wait limit → one backend call → per-request results.

Plain asyncio; the backend runs in one worker thread so the event loop keeps accepting requests.
Every accepted request gets exactly one outcome: its logits, its own error, or a timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .backend import Backend, ScoreRequest


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
    def __init__(self, backend: Backend, max_batch_rows: int, max_wait_ms: float, max_queue_rows: int,
                 on_batch: Callable[[int, int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None):
        self.backend = backend
        self.max_batch_rows, self.max_wait = max_batch_rows, max_wait_ms / 1000
        self.max_queue_rows = max_queue_rows
        self.on_batch, self.on_queue = on_batch, on_queue
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.queued_rows = 0
        self.inflight = 0
        self.batches = 0
        self.closing = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dalorra-backend")
        self._task: asyncio.Task | None = None
        self._carry: _Pending | None = None
        self._last_batch_seconds = 0.1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def admit(self, rows: int) -> None:
        """Raise unless `rows` more rows fit in the queue (checked for a whole request before any item queues)."""
        if self.closing:
            raise ShuttingDown("server is shutting down")
        if self.queued_rows + rows > self.max_queue_rows:
            # Time to drain what is queued, at the last batch's speed: a fair Retry-After.
            per_row = self._last_batch_seconds / max(1, self.max_batch_rows)
            raise Overloaded(max(1.0, self.queued_rows * per_row))

    async def submit(self, req: ScoreRequest, admitted: bool = False):
        """Queue one request; returns its (S, K) logits or raises its own error.

        admitted=True: part of a request already admitted (a later adaptive round), never refused."""
        if not admitted:
            self.admit(req.rows)
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
                nxt = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
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
            self._last_batch_seconds = dt
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
