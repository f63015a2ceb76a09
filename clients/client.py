"""Python client for the dalorra server (sync and async, httpx), reusing the server's protocol models.

Usage:

    from clients.client import Client
    with Client("http://127.0.0.1:8000") as c:
        r = c.predict("Which is a mammal?", ["whale", "shark"])
        print(r.answer, r.confidence, r.decision)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from server.protocol import AdapterList, FeedbackResponse, PredictItem, PredictResponse

RETRY_STATUSES = (429, 503)


class DalorraError(Exception):
    """A 4xx/5xx answer from the server: status, error type and the server's message."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(f"{status} {type_}: {message}" if status else message)  # 0: no HTTP answer
        self.status, self.type, self.message = status, type_, message


class BadRequest(DalorraError):
    """The request was invalid (4xx other than 401/403/404/429)."""


class Unauthorized(DalorraError):
    """401/403: missing or wrong token, or a forged receipt."""


class NotFound(DalorraError):
    """404: unknown adapter or route."""


class Overloaded(DalorraError):
    """429/503 after every retry."""


class Unreachable(DalorraError):
    """No HTTP answer at all: nothing listens at the URL, or the server did not answer in time."""


def _unreachable(url: httpx.URL, exc: httpx.TransportError) -> Unreachable:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return Unreachable(
            0,
            "timeout",
            f"{url} did not answer in time ({type(exc).__name__}); raise the timeout or lower samples",
        )
    return Unreachable(
        0,
        "unreachable",
        f"cannot connect to {url} ({type(exc).__name__}: {exc or 'no detail'}); "
        "is the server running, and are the host and port right?",
    )


# Only failures where the request never reached the server are retried: a retry can then not run it twice.
SAFE_TO_RETRY = (httpx.ConnectError, httpx.ConnectTimeout)


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        type_, msg = err["type"], err["message"]
    except Exception:
        type_, msg = "http_error", resp.text[:500]
    cls = {401: Unauthorized, 403: Unauthorized, 404: NotFound, 429: Overloaded, 503: Overloaded}.get(
        resp.status_code, BadRequest if resp.status_code < 500 else DalorraError
    )
    raise cls(resp.status_code, type_, msg)


def _retry_after(resp: httpx.Response, attempt: int, backoff: float) -> float:
    ra = resp.headers.get("retry-after")
    try:
        return max(0.0, float(ra)) if ra is not None else backoff * 2**attempt
    except ValueError:
        return backoff * 2**attempt


def _items(question: str, choices: list[str], kw: dict[str, Any]) -> dict[str, Any]:
    return PredictItem(question=question, choices=list(choices), **kw).model_dump(exclude_none=True)


class Client:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self.retries, self.backoff = retries, backoff

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                if isinstance(exc, SAFE_TO_RETRY) and attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                raise _unreachable(self.http.base_url, exc) from None
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                time.sleep(_retry_after(resp, attempt, self.backoff))  # honour Retry-After
                continue
            _raise_for(resp)
            return resp
        raise AssertionError("unreachable")

    def predict(self, question: str, choices: list[str], **kw) -> PredictResponse:
        r = self._request("POST", "/predict", json=_items(question, choices, kw))
        return PredictResponse.model_validate(r.json())

    def predict_many(self, items: list[dict]) -> list[PredictResponse]:
        body = [PredictItem(**it).model_dump(exclude_none=True) for it in items]
        return [
            PredictResponse.model_validate(x) for x in self._request("POST", "/predict", json=body).json()
        ]

    def feedback(self, receipt: str, label: int) -> FeedbackResponse:
        return FeedbackResponse.model_validate(
            self._request("POST", "/feedback", json={"receipt": receipt, "label": label}).json()
        )

    def adapters(self) -> AdapterList:
        return AdapterList.model_validate(self._request("GET", "/v1/adapters").json())

    def ready(self) -> bool:
        try:
            return self.http.get("/health/ready").status_code == 200
        except httpx.HTTPError:
            return False


class AsyncClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout)
        self.retries, self.backoff = retries, backoff

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = await self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                if isinstance(exc, SAFE_TO_RETRY) and attempt < self.retries:
                    await asyncio.sleep(self.backoff * 2**attempt)
                    continue
                raise _unreachable(self.http.base_url, exc) from None
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                await asyncio.sleep(_retry_after(resp, attempt, self.backoff))
                continue
            _raise_for(resp)
            return resp
        raise AssertionError("unreachable")

    async def predict(self, question: str, choices: list[str], **kw) -> PredictResponse:
        r = await self._request("POST", "/predict", json=_items(question, choices, kw))
        return PredictResponse.model_validate(r.json())

    async def feedback(self, receipt: str, label: int) -> FeedbackResponse:
        r = await self._request("POST", "/feedback", json={"receipt": receipt, "label": label})
        return FeedbackResponse.model_validate(r.json())

    async def adapters(self) -> AdapterList:
        return AdapterList.model_validate((await self._request("GET", "/v1/adapters")).json())

    async def ready(self) -> bool:
        try:
            return (await self.http.get("/health/ready")).status_code == 200
        except httpx.HTTPError:
            return False
