"""The OpenAI wire format of server/openai_api.py: errors (with `param` and `code`), log-probabilities, server-sent
events, and an event stream that always ends well-formed.

OpenAI's error body is {"error": {"message", "type", "param", "code"}}: `param` names the request field at fault
(e.g. "max_epistemic", "messages.0.content"), `code` is the machine-readable reason (pydantic's error type for a
value the schema refuses, e.g. "finite_number", "less_than_equal", else the error type).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import anyio
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Send

from adapters.generation import GeneratedChoice

from .backend import PromptLogprobs
from .errors import ApiError

FINAL_SEND_S = 2.0  # how long the last event of a cancelled stream may take to leave (a stalled client)
TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}  # pydantic's union-branch labels


def _error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def openai_error(exc: ApiError) -> JSONResponse:
    param, code = getattr(exc, "param", None), getattr(exc, "code", None) or exc.type
    return JSONResponse(
        _error_body(exc.message, exc.type, param, code), status_code=exc.status, headers=exc.headers
    )


def _param(loc: Sequence[int | str]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') → 'messages.0.content' (pydantic's union-branch labels dropped)."""
    parts = [
        str(x)
        for x in loc[1:]
        if isinstance(x, int) or (x not in TYPE_TAGS and "[" not in x and not x.startswith("function-"))
    ]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """A request the schema refuses: 400 for a body that is not JSON, else 422 naming the first field at fault."""
    errs = exc.errors()
    bad_json = [e for e in errs if e.get("type") == "json_invalid"]
    if bad_json:
        e = bad_json[0]
        msg = f"the body is not valid JSON: {(e.get('ctx') or {}).get('error', '')}"
        return JSONResponse(_error_body(msg, "malformed_json", None, "json_invalid"), status_code=400)
    if not errs:
        return JSONResponse(_error_body("invalid request", "invalid_request", None, None), status_code=422)
    e = errs[0]
    param = _param(e.get("loc", ()))
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    msg = f"{param or 'body'}: {e.get('msg')}{more}"
    return JSONResponse(_error_body(msg, "invalid_request", param, e.get("type")), status_code=422)


# ---- log-probabilities ---------------------------------------------------------------------------------
def completion_logprobs(
    tokens: Sequence[str],
    lps: Sequence[float | None],
    tops: Sequence[Sequence[tuple[str, float]] | None],
    offset: int = 0,
) -> dict:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs (a dict per token, null where there
    is none: an echoed prompt's first token) and text_offset (characters into the choice's text)."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": list(tokens),
        "token_logprobs": list(lps),
        "top_logprobs": [None if top is None else dict(top) for top in tops],
        "text_offset": offsets,
    }


def echoed_logprobs(echo: PromptLogprobs | None, c: GeneratedChoice | None, prompt_chars: int) -> dict:
    """The prompt's tokens (when echoed) then the completion's, one `logprobs` object; the completion's offsets
    start after the echoed prompt text."""
    a = completion_logprobs(echo.tokens, echo.token_logprobs, echo.top_logprobs) if echo else None
    b = completion_logprobs(c.tokens, c.logprobs or [], c.top_logprobs or [], prompt_chars) if c else None
    if a is None or b is None:
        return a or b or completion_logprobs([], [], [])
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(tokens: list[str], lps: list[float], tops: list[list[tuple[str, float]]]) -> dict:
    def one(t: str, lp: float) -> dict:
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))}

    return {
        "content": [
            {**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]}
            for t, lp, top in zip(tokens, lps, tops, strict=True)
        ]
    }


# ---- server-sent events --------------------------------------------------------------------------------
def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def error_event(exc: ApiError) -> str:
    """A failure after the stream started: one error event (the OpenAI client raises it) and [DONE]."""
    param, code = getattr(exc, "param", None), getattr(exc, "code", None) or exc.type
    return sse(_error_body(exc.message, exc.type, param, code)) + "data: [DONE]\n\n"


STOPPED = ApiError(
    503,
    "unavailable",
    "the server stopped this stream before it finished (shutting down); retry the request",
)


class EventStream(StreamingResponse):
    """Server-sent events that always end well-formed. When the server cancels the response — at shutdown, once
    uvicorn's graceful period is over, or when the client has left — the body iterator is closed (its work
    stops) and one last error event and [DONE] go out shielded from the cancellation, so a reader never sees a
    body cut mid-stream (issue #28)."""

    def __init__(
        self,
        content: AsyncIterator[str],
        on_cancel: Callable[[], Awaitable[object]] | None = None,
    ):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_cancel = on_cancel

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                data = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": data, "more_body": True})
        except anyio.get_cancelled_exc_class():
            with anyio.move_on_after(FINAL_SEND_S, shield=True):
                for close in (getattr(self.body_iterator, "aclose", None), self.on_cancel):
                    if close is not None:
                        await close()
                last = error_event(STOPPED).encode()
                await send({"type": "http.response.body", "body": last, "more_body": False})
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})
