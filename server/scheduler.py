"""The one scheduler of a process: every use of the model — /predict, KServe and OpenAI multiple-choice batches,
generation's decoding steps and the pieces of its uncertainty pass — takes its turn here, one at a time.

    score requests ──► per-adapter queues ──┐   round-robin over adapters (fair), up to max_batch_rows
                                            ├─► one backend.score call on the backend thread ─► per-request results
    generation pieces (worker threads) ─────┘   gate(rows): the thread runs its own forward while the loop waits

Work is measured in rows (one row ≈ one multiple-choice question under one mask; a generation piece counts its
tokens in rows of ROW_TOKENS). Admission keeps 429 honest: a request is admitted only if the rows already admitted
plus its own can be scored before its deadline at the measured drain rate (seconds per row, a moving average over
all work); a request too large to finish before its deadline even on an idle server is refused at once (413), and
a full queue answers 429 with a Retry-After from the same estimate. A caller that gives up (timeout, client gone)
cancels its future, and its queued work is skipped, never run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend, Scored, ScoreRequest

GATE_TIMEOUT_S = 600.0  # a worker thread waiting longer than this for its turn gives up (the loop is gone)


class Overloaded(Exception):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"server overloaded; retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class TooLarge(Exception):
    """One request needs more rows than this server can score before its deadline, even when idle."""

    def __init__(self, rows: int, limit: int):
        super().__init__(
            f"request needs {rows} rows (items × samples); at the measured rate this server scores at most "
            f"{limit} before the deadline: split it or lower samples"
        )
        self.rows, self.limit = rows, limit


class ShuttingDown(Exception):
    """The server is draining and accepts no new work."""


class BatchFailed(RuntimeError):
    """The backend call of the batch this request was in failed as a whole (not this request's own error)."""

    def __init__(self, requests: int, cause: BaseException):
        super().__init__(
            f"the backend failed on the batch of {requests} requests this one was in "
            f"({type(cause).__name__}: {cause}); the server keeps serving: retry"
        )


def as_scored(x: np.ndarray | Scored | Exception) -> Scored | Exception:
    """Backends answer Scored (or an exception); a bare logits array is wrapped, so callers see one type."""
    return x if isinstance(x, Scored | Exception) else Scored(np.asarray(x))


@dataclass
class _Pending:
    req: ScoreRequest
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Turn:
    """A worker thread's piece of work: it runs when `granted` is set; the loop waits for `done`."""

    rows: int
    granted: threading.Event = field(default_factory=threading.Event)
    done: asyncio.Future | None = None
    refused: BaseException | None = None
    started: float = 0.0


class Scheduler:
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
        self.queues: dict[str, deque[_Pending]] = {}  # adapter → its waiting score requests, in order
        self.turns: deque[_Turn] = deque()
        self._order: deque[str] = deque()  # round-robin order of adapters with queued work
        self.queued_rows = 0
        self.inflight = 0
        self.batches = 0
        self.turns_run = 0
        self.closing = False
        self.admitted_rows = 0  # rows of admitted work not yet answered (queued, running, between rounds)
        self.row_seconds: float | None = None  # measured seconds per row (EMA); None until work ran
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dalorra-backend")
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kinds_turn = False  # alternates batches and generation pieces when both wait

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._run())

    # ---- admission ----------------------------------------------------------------------------------
    def capacity(self, deadline_s: float | None) -> int:
        """Rows that can be answered within `deadline_s` at the measured rate (the queue bound if unknown)."""
        if deadline_s is None or self.row_seconds is None:
            return self.max_queue_rows
        return min(self.max_queue_rows, int(deadline_s / self.row_seconds))

    def admit(self, rows: int, deadline_s: float | None = None) -> None:
        """Reserve `rows` for a whole request, or raise: TooLarge when the request alone cannot finish before
        `deadline_s` (or exceeds the queue); Overloaded when the backlog plus these rows cannot. Until any work
        has been measured, at most one batch of rows is admitted beside other work. release() frees them."""
        if self.closing:
            raise ShuttingDown("server is shutting down")
        limit = self.capacity(deadline_s)
        if rows > limit and (self.row_seconds is not None or rows > self.max_queue_rows):
            raise TooLarge(rows, limit)
        if self.row_seconds is None and deadline_s is not None:
            limit = min(limit, self.max_batch_rows)
        backlog = self.admitted_rows + rows
        if backlog > limit and self.admitted_rows > 0:
            # Retry-After: the time until enough of the backlog has drained for these rows to fit.
            raise Overloaded(max(1.0, (backlog - limit) * (self.row_seconds or 0.0)))
        self.admitted_rows = backlog

    def release(self, rows: int) -> None:
        self.admitted_rows = max(0, self.admitted_rows - rows)

    # ---- score requests -----------------------------------------------------------------------------
    async def submit(self, req: ScoreRequest, admitted: bool = False) -> Scored:
        """Queue one request; returns its Scored (S, K) logits or raises its own error.

        admitted=True: its rows were reserved by admit() (the caller releases them); otherwise they are
        reserved here and released when it is answered."""
        if not admitted:
            self.admit(req.rows)
            try:
                return await self.submit(req, admitted=True)
            finally:
                self.release(req.rows)
        if self.closing and self._task is None:
            raise ShuttingDown("server is shutting down")
        fut = asyncio.get_running_loop().create_future()
        if req.adapter not in self.queues:
            self.queues[req.adapter] = deque()
            self._order.append(req.adapter)
        self.queues[req.adapter].append(_Pending(req, fut))
        self.queued_rows += req.rows
        self._report_queue()
        self._wake.set()
        return await fut

    # ---- generation pieces (called from worker threads) ---------------------------------------------
    @contextmanager
    def gate(self, rows: int) -> Iterator[None]:
        """In a worker thread: wait for this piece's turn, hold the model for the block, then hand it back.
        `rows` is the piece's cost in rows (the queue gauge and the drain-rate estimate count it; admission
        counted it when the generation was admitted as a whole)."""
        if self._loop is None:
            raise ShuttingDown("the scheduler is not running")
        turn = _Turn(max(1, int(rows)))
        self._loop.call_soon_threadsafe(self._enqueue_turn, turn)
        if not turn.granted.wait(GATE_TIMEOUT_S):
            raise ShuttingDown("the scheduler did not grant a turn")
        if turn.refused is not None:
            raise turn.refused
        try:
            yield
        finally:
            self._loop.call_soon_threadsafe(self._finish_turn, turn)

    def _enqueue_turn(self, turn: _Turn) -> None:
        if self._task is None or self._task.done():
            turn.refused = ShuttingDown("server is shutting down")
            turn.granted.set()
            return
        turn.done = self._loop.create_future()
        self.turns.append(turn)
        self.queued_rows += (
            turn.rows
        )  # admitted as part of its generation's reservation (admit() at its start)
        self._report_queue()
        self._wake.set()

    def _finish_turn(self, turn: _Turn) -> None:
        if turn.done is not None and not turn.done.done():
            turn.done.set_result(None)

    # ---- the loop -----------------------------------------------------------------------------------
    def _report_queue(self) -> None:
        if self.on_queue:
            self.on_queue(self.queued_rows)

    def _has_batch(self) -> bool:
        return bool(self._order)

    def _skip_gone(self, q: deque[_Pending]) -> None:
        while q and q[0].future.done():  # a caller that gave up (timeout, client gone): never scored
            self.queued_rows -= q.popleft().req.rows

    def _take_batch(self) -> list[_Pending]:
        """Up to max_batch_rows of queued requests, one request per adapter in turn (round-robin), so a busy
        adapter cannot starve the others. A request that does not fit goes first in the next batch."""
        batch, rows = [], 0
        for name in list(self._order):
            self._skip_gone(self.queues[name])
            if not self.queues[name]:
                self._order.remove(name)
                del self.queues[name]
        while self._order and rows < self.max_batch_rows:
            name = self._order.popleft()
            q = self.queues[name]
            if batch and rows + q[0].req.rows > self.max_batch_rows:
                self._order.appendleft(name)
                break
            p = q.popleft()
            self.queued_rows -= p.req.rows
            batch.append(p)
            rows += p.req.rows
            self._skip_gone(q)
            if q:
                self._order.append(name)
            else:
                del self.queues[name]
        self._report_queue()
        return batch

    def _measure(self, seconds: float, rows: int) -> None:
        per_row = seconds / max(1, rows)
        self.row_seconds = per_row if self.row_seconds is None else 0.7 * self.row_seconds + 0.3 * per_row

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.turns and not self._has_batch():
                self._wake.clear()
                await self._wake.wait()
                continue
            turn_next = self.turns and (not self._has_batch() or self._kinds_turn)
            self._kinds_turn = not turn_next
            if turn_next:
                await self._run_turn(self.turns.popleft())
                continue
            if self.queued_rows < self.max_batch_rows and self.max_wait > 0 and not self.turns:
                await asyncio.sleep(self.max_wait)  # let a batch fill
            batch = self._take_batch()
            if batch:
                await self._run_batch(loop, batch)

    async def _run_turn(self, turn: _Turn) -> None:
        self.queued_rows -= turn.rows
        self._report_queue()
        t0 = time.perf_counter()
        self.inflight += 1
        turn.granted.set()
        try:
            await turn.done
        finally:
            self.inflight -= 1
        self.turns_run += 1
        self._measure(time.perf_counter() - t0, turn.rows)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        self.inflight += len(live)
        rows = sum(p.req.rows for p in live)
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._pool, self.backend.score, [p.req for p in live])
            if len(results) != len(live):
                raise RuntimeError(f"backend returned {len(results)} results for {len(live)} requests")
        except Exception as exc:  # the whole call failed: every request of this batch, and only those, fail
            failed = BatchFailed(len(live), exc)
            results = [failed] * len(live)
        dt = time.perf_counter() - t0
        self._measure(dt, rows)
        self.batches += 1
        if self.on_batch:
            self.on_batch(len(live), rows, dt)
        for p, res in zip(live, results, strict=True):
            if p.future.done():
                continue
            res = as_scored(res)
            if isinstance(res, Exception):
                p.future.set_exception(res)
            else:
                p.future.set_result(res)
        self.inflight -= len(live)

    async def drain(self, timeout: float) -> None:
        """Stop accepting; wait until queued and in-flight work is answered (or timeout)."""
        self.closing = True
        end = time.perf_counter() + timeout
        while (self.queued_rows > 0 or self.inflight > 0 or self.turns) and time.perf_counter() < end:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for turn in list(self.turns):  # threads still waiting for a turn are told, never left hanging
            turn.refused = ShuttingDown("server is shutting down")
            turn.granted.set()
        self.turns.clear()
        for q in self.queues.values():
            for p in q:
                if not p.future.done():
                    p.future.set_exception(ShuttingDown("server is shutting down"))
        self.queues.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
