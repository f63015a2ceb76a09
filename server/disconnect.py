"""Stop work whose client has gone: a non-streaming handler runs as a task beside a watcher of the connection.

Starlette keeps running a handler after its client disconnects; for a /predict batch or a generation that is
wasted model time other requests wait for. `until_disconnected` cancels the handler's work when the client goes:
queued rows are skipped by the scheduler and a generation stops at its next piece (its cancel flag is set).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from .errors import ApiError

T = TypeVar("T")
POLL_S = 0.2  # how often the connection is checked while work runs
CLIENT_CLOSED = (
    499  # the status nginx logs for a client that closed the connection (never sent: nobody listens)
)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or ApiError(499) once the client has disconnected (the work is cancelled)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ApiError(
                    CLIENT_CLOSED, "client_closed", "the client closed the connection; its work stopped"
                )
    finally:
        if not task.done():  # the handler itself was cancelled (server shutdown)
            task.cancel()
