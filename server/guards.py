"""Guards in front of the app, at the ASGI and connection level: Host check, body size on the bytes actually
read (chunked bodies included), and read timeouts for request bodies and request heads.

The Content-Length header alone is not a limit: a chunked body has none, so the guard counts what it reads
and answers 413 as soon as the count passes the limit, without reading the rest.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def send_error(send: Send, status: int, type_: str, message: str, headers: dict | None = None) -> None:
    """The API's one error shape, written straight to ASGI (used before the app sees the request)."""
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    hdrs = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def host_name(host: str) -> str:
    """'Example.com:8000' → 'example.com'; '[::1]:8000' → '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """ASGI middleware: refuses a Host not in `allowed_hosts` (when given), and reads a request body whole,
    up to `max_body_bytes` and within `body_timeout_s` per read, before the app sees it."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float,
        allowed_hosts: list[str] | None = None,
        on_reject: Callable[[str, int], None] | None = None,
    ):
        self.app, self.limit, self.timeout = app, max_body_bytes, body_timeout_s
        self.allowed = {h.lower() for h in allowed_hosts or []}
        self.on_reject = on_reject or (lambda path, status: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self.allowed and "*" not in self.allowed:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                self.on_reject(path, 400)
                return await send_error(
                    send,
                    400,
                    "invalid_host",
                    "the Host header is not one this server answers to (DALORRA_ALLOWED_HOSTS)",
                )
        if scope.get("method") not in BODY_METHODS:
            return await self.app(scope, receive, send)
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > self.limit:
            self.on_reject(path, 413)
            return await send_error(send, 413, "too_large", f"body exceeds {self.limit} bytes")
        body, more = bytearray(), True
        while more:
            try:
                msg = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                self.on_reject(path, 408)
                return await send_error(
                    send,
                    408,
                    "body_timeout",
                    f"the request body did not arrive within {self.timeout:g} s of the last bytes received",
                )
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                self.on_reject(path, 413)
                return await send_error(send, 413, "too_large", f"body exceeds {self.limit} bytes")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: the client's disconnect, for streaming responses

        return await self.app(scope, replay, send)


def head_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head (line and headers) has not fully
    arrived `seconds` after the connection opened or the previous response ended. uvicorn's own keep-alive
    timeout covers only a connection that sends nothing; one that trickles a partial head stayed open."""

    class HeadTimeoutH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _head_timeout(self) -> None:
            # h11 keeps their_state IDLE until the whole request head has been parsed
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return HeadTimeoutH11
