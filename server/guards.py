"""Guards in front of the app, at the ASGI and connection level: Host check, the API token on every route that is
not meant to be open, a same-host proxy's client never taken for a loopback client, body size on the bytes
actually read (chunked bodies included), and read timeouts for request bodies and request heads.

The Content-Length header alone is not a limit: a chunked body has none, so the guard counts what it reads
and answers 413 as soon as the count passes the limit, without reading the rest.

A body has two clocks: no read may wait longer than `body_timeout_s`, and the whole body must arrive by
`body_timeout_s` + bytes received / `body_min_rate` (Apache mod_reqtimeout's MinRate). The first cuts a body
that stalls; the second one that drips (a byte every few seconds never trips a per-read timeout).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
from collections.abc import Callable

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
BODY_MIN_RATE = 1024.0  # bytes/s a body must average, on top of the first body_timeout_s

# With DALORRA_API_TOKEN set, these stay open: what orchestrators probe and Prometheus scrapes without
# credentials, and the static page. Everything else (unknown paths included) needs the token, except adapter
# load/unload, whose own check takes the admin token (app.py).
OPEN_PATHS = frozenset(
    {"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics", "/"}
)
ADMIN_PATH = re.compile(r"^/v1/adapters/[^/]+/(load|unload)$")

# Headers a reverse proxy adds to name the client it relays for. On a request from a loopback peer they mean
# the peer is a same-host proxy, not the client; uvicorn resolves only X-Forwarded-For.
PROXY_HEADERS = (
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-real-ip",
    b"x-client-ip",
    b"true-client-ip",
    b"cf-connecting-ip",
    b"fastly-client-ip",
    b"x-cluster-client-ip",
)
PROXIED = "proxied"  # the client host of a relayed request whose proxy named no usable address


async def send_error(
    send: Send, path: str, status: int, type_: str, message: str, headers: dict | None = None
) -> None:
    """The API's one error shape, written straight to ASGI (used before the app sees the request); on the KServe
    v2 paths the protocol's own shape, {"error": "<string>"}, which tritonclient formats."""
    err: object = message if path.startswith("/v2") else {"type": type_, "message": message}
    body = json.dumps({"error": err}).encode()
    hdrs = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _forwarded_for(value: str) -> str:
    """The first hop's address in RFC 7239 `Forwarded` ('for="[2001:db8::1]:443";proto=https, for=…')."""
    for part in value.split(",", 1)[0].split(";"):
        key, _, v = part.strip().partition("=")
        if key.strip().lower() == "for":
            return host_name(v.strip().strip('"'))
    return ""


def relayed_client(headers: dict[bytes, bytes], client: tuple[str, int] | None) -> tuple[str, int] | None:
    """The client to record for a request. A loopback peer that sends any proxy header is a same-host proxy:
    the client is the address it names (X-Real-IP, else Forwarded's first `for=`) when that is a non-loopback
    IP, else PROXIED. Either way it is not a loopback client, whatever the headers claim; a header that a
    proxy only passed through from the internet may say anything."""
    if client is None or not _is_loopback(client[0]) or not any(h in headers for h in PROXY_HEADERS):
        return client
    named = [
        headers.get(b"x-real-ip", b"").decode("latin-1").strip(),
        _forwarded_for(headers.get(b"forwarded", b"").decode("latin-1")),
    ]
    for addr in named:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            continue
        if not ip.is_loopback:
            return (str(ip), 0)
    return (PROXIED, 0)


def _api_token(scope: Scope) -> str | None:
    """DALORRA_API_TOKEN of the app this guard fronts (create_app publishes its settings on app.state)."""
    settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
    return getattr(settings, "api_token", None)


def _admin_token(scope: Scope) -> str | None:
    settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
    return getattr(settings, "admin_token", None)


def token_ok(headers: dict[bytes, bytes], expected: str) -> bool:
    got = headers.get(b"authorization", b"").decode("latin-1")
    token = got[7:] if got.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), expected.encode())  # constant time; never logged


def host_name(host: str) -> str:
    """'Example.com:8000' → 'example.com'; '[::1]:8000' → '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """ASGI middleware: refuses a Host not in `allowed_hosts` (when given) and, with an API token set, a request
    without it to any path but OPEN_PATHS and adapter management; records a same-host proxy's request as not
    from loopback (`relayed_client`); reads a request body whole, up to `max_body_bytes`, within
    `body_timeout_s` per read and at `body_min_rate` bytes/s overall, before the app sees it."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float,
        allowed_hosts: list[str] | None = None,
        on_reject: Callable[[str, int], None] | None = None,
        body_min_rate: float = BODY_MIN_RATE,
    ):
        self.app, self.limit, self.timeout = app, max_body_bytes, body_timeout_s
        self.min_rate = body_min_rate
        self.allowed = {h.lower() for h in allowed_hosts or []}
        self.on_reject = on_reject or (lambda path, status: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        client = relayed_client(headers, scope.get("client"))
        if client != scope.get("client"):
            scope = {**scope, "client": client}
        if self.allowed and "*" not in self.allowed:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                self.on_reject(path, 400)
                return await send_error(
                    send,
                    path,
                    400,
                    "invalid_host",
                    "the Host header is not one this server answers to (DALORRA_ALLOWED_HOSTS)",
                )
        token = _api_token(scope)
        admin = _admin_token(scope)  # the admin token is the stronger credential: it opens every route
        if (
            token
            and path not in OPEN_PATHS
            and not ADMIN_PATH.match(path)
            and not token_ok(headers, token)
            and not (admin and token_ok(headers, admin))
        ):
            self.on_reject(path, 401)
            return await send_error(
                send,
                path,
                401,
                "unauthorized",
                "missing or wrong bearer token",
                {"WWW-Authenticate": "Bearer"},
            )
        if scope.get("method") not in BODY_METHODS:
            return await self.app(scope, receive, send)
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > self.limit:
            self.on_reject(path, 413)
            return await send_error(send, path, 413, "too_large", f"body exceeds {self.limit} bytes")
        loop = asyncio.get_running_loop()
        start = loop.time()
        body, more = bytearray(), True
        while more:
            deadline = start + self.timeout + len(body) / self.min_rate
            wait = min(self.timeout, deadline - loop.time())
            try:
                if wait <= 0:
                    raise TimeoutError
                msg = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                self.on_reject(path, 408)
                return await send_error(
                    send,
                    path,
                    408,
                    "body_timeout",
                    f"the request body did not arrive in time: at most {self.timeout:g} s between reads, and "
                    f"{self.timeout:g} s plus 1 s per {self.min_rate:g} bytes in all",
                )
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                self.on_reject(path, 413)
                return await send_error(send, path, 413, "too_large", f"body exceeds {self.limit} bytes")
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
