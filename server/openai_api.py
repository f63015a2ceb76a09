"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

The adapter is the `model`. Each choice carries one extra object, `uncertainty`, that OpenAI clients ignore
(README "OpenAI-compatible API"). A request with a `choices` list is multiple choice: it is answered by
/predict's path and its `uncertainty` is /predict's response. Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}. Routes only translate; the logic is in gen_service.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .disconnect import until_disconnected
from .errors import ApiError
from .gen_service import GenerationService, new_id
from .generation import GenerateRequest, GenerateResult
from .openai_protocol import ChatCompletionRequest, CompletionRequest, _Common
from .protocol import PredictItem
from .registry import AdapterRecord


def generation_service(request: Request) -> GenerationService:
    """One GenerationService per Service (built on first use, after the lifespan has made the Service)."""
    svc = request.app.state.service
    g = getattr(request.app.state, "generation", None)
    if g is None or g.svc is not svc:
        g = request.app.state.generation = GenerationService(svc)
    return g


def openai_error(exc: ApiError) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.type}},
        status_code=exc.status,
        headers=exc.headers,
    )


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(res: GenerateResult) -> dict:
    done = sum(len(c.token_ids) for c in res.choices)
    return {
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": done,
        "total_tokens": res.prompt_tokens + done,
    }


def _chat_logprobs(tokens: list[str], lps: list[float], tops: list[list[tuple[str, float]]]) -> dict:
    def one(t: str, lp: float) -> dict:
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))}

    return {
        "content": [
            {**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]}
            for t, lp, top in zip(tokens, lps, tops, strict=True)
        ]
    }


def _completion_logprobs(
    tokens: list[str], lps: list[float], tops: list[list[tuple[str, float]]], offset: int = 0
) -> dict:
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": [dict(top) for top in tops],
        "text_offset": offsets,
    }


def _check(body: _Common) -> None:
    bad = body.unsupported()
    if bad:
        raise ApiError(422, "unsupported_parameter", f"not supported by this server: {', '.join(bad)}")


def router() -> APIRouter:
    r = APIRouter(tags=["openai"])

    @r.get("/v1/models", response_model=None)
    async def list_models(request: Request) -> dict:
        reg = request.app.state.service.registry
        return {"object": "list", "data": [_model_card(rec) for rec in reg.records()]}

    @r.get("/v1/models/{model}", response_model=None)
    async def get_model(model: str, request: Request) -> JSONResponse | dict:
        if model not in request.app.state.service.registry:
            return openai_error(ApiError(404, "model_not_found", f"model {model!r} is not loaded"))
        return _model_card(request.app.state.service.registry.get(model))

    @r.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            _check(body)
            if isinstance(body.prompt, list):
                if len(body.prompt) != 1:
                    raise ApiError(422, "invalid_request", "prompt: one string per request (a list of one)")
                prompt = body.prompt[0]
            else:
                prompt = body.prompt
            if body.choices is not None:
                return await _multiple_choice(request, body, prompt, None, chat=False)
            g = generation_service(request)
            req = g.plan(
                body.model,
                prompt=prompt,
                max_tokens=body.max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=body.stops(),
                seed=body.seed,
                n=body.n,
                top_logprobs=body.logprobs,
                samples=body.samples,
                mask_seed=body.mask_seed,
                ignore_eos=body.ignore_eos,
            )
            return await _respond(g, req, body, chat=False, request=request)
        except ApiError as exc:
            return openai_error(exc)

    @r.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            _check(body)
            try:
                messages = tuple(
                    ("system" if m.role == "developer" else m.role, m.text()) for m in body.messages
                )
            except ValueError as exc:
                raise ApiError(422, "invalid_request", f"messages: {exc}") from None
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(422, "invalid_request", "top_logprobs needs logprobs=true")
            if body.choices is not None:
                users = [i for i, (role, _) in enumerate(messages) if role == "user"]
                if not users:
                    raise ApiError(
                        422, "invalid_request", "multiple choice needs a user message (the question)"
                    )
                last = users[-1]
                earlier = "\n".join(c for _, c in messages[:last] if c.strip())
                return await _multiple_choice(request, body, messages[last][1], earlier or None, chat=True)
            g = generation_service(request)
            req = g.plan(
                body.model,
                messages=messages,
                max_tokens=body.max_completion_tokens or body.max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=body.stops(),
                seed=body.seed,
                n=body.n,
                top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                samples=body.samples,
                mask_seed=body.mask_seed,
                ignore_eos=body.ignore_eos,
            )
            return await _respond(g, req, body, chat=True, request=request)
        except ApiError as exc:
            return openai_error(exc)

    return r


def _model_card(rec: AdapterRecord) -> dict:
    return {
        "id": rec.name,
        "object": "model",
        "created": int(rec.loaded_at),
        "owned_by": "dalorra",
        "root": rec.base_model,
        "parent": None,
    }


async def _respond(
    g: GenerationService, req: GenerateRequest, body: _Common, chat: bool, request: Request
) -> JSONResponse | StreamingResponse:
    rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    if not body.stream:
        res = await until_disconnected(request, g.generate(req))  # a client that leaves stops the decoding
        choices = []
        for i, c in enumerate(res.choices):
            unc = g.uncertainty(req.adapter, res, i, body.min_confidence, body.max_epistemic)
            lp = None
            if c.logprobs is not None:
                lp = (_chat_logprobs if chat else _completion_logprobs)(c.tokens, c.logprobs, c.top_logprobs)
            out = {"index": i, "logprobs": lp, "finish_reason": c.finish_reason, "uncertainty": unc}
            out.update({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})
            choices.append(out)
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": req.adapter,
                "choices": choices,
                "usage": _usage(res),
            }
        )
    events = g.events(req, stream=True)
    first = (
        await events.__anext__()
    )  # a bad prompt or a full server is still an HTTP error, not a broken stream
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        return _sse(
            {
                "id": rid,
                "object": chunk_obj,
                "created": created,
                "model": req.adapter,
                "choices": choices,
                **extra,
            }
        )

    async def sse() -> AsyncIterator[str]:
        offsets = [0] * req.n
        try:
            if chat:
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for i in range(req.n)
                    ]
                )
            ev = first
            while ev[0] != "done":
                _, i, text, info = ev
                if text or info:
                    lp = None
                    if info is not None:
                        lp = (
                            _chat_logprobs([info["token"]], [info["logprob"]], [info["top"]])
                            if chat
                            else _completion_logprobs(
                                [info["token"]], [info["logprob"]], [info["top"]], offsets[i]
                            )
                        )
                        offsets[i] += len(info["token"])
                    c = {"index": i, "logprobs": lp, "finish_reason": None}
                    c.update({"delta": {"content": text}} if chat else {"text": text})
                    yield chunk([c])
                ev = await events.__anext__()
            res: GenerateResult = ev[1]
            last = []
            for i, c in enumerate(res.choices):
                unc = g.uncertainty(req.adapter, res, i, body.min_confidence, body.max_epistemic)
                e = {"index": i, "logprobs": None, "finish_reason": c.finish_reason, "uncertainty": unc}
                e.update({"delta": {}} if chat else {"text": ""})
                last.append(e)
            yield chunk(last, usage=_usage(res))  # the final chunk: finish reasons, uncertainty and usage
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # a disconnected client: the decoding stops and its slot is freed

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _multiple_choice(
    request: Request, body: _Common, question: str, context: str | None, chat: bool
) -> JSONResponse | StreamingResponse:
    """Answer by scoring the listed choices, exactly as POST /predict does; `uncertainty` is its response."""
    if body.n != 1:
        raise ApiError(422, "invalid_request", "multiple choice returns one answer: n must be 1")
    if body.samples == 0:
        raise ApiError(422, "invalid_request", "multiple choice needs samples >= 1")
    try:
        item = PredictItem(
            question=question,
            choices=body.choices,
            context=body.context or context,
            adapter=body.model,
            samples=body.samples,
            seed=body.mask_seed,
            min_confidence=body.min_confidence,
            max_epistemic=body.max_epistemic,
        )
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", str(exc.errors()[0].get("msg"))) from None
    svc = request.app.state.service
    pr = (await until_disconnected(request, svc.predict([item])))[0]
    rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    unc = {"kind": "multiple_choice", **pr.model_dump()}
    choice = {"index": 0, "logprobs": None, "finish_reason": "stop", "uncertainty": unc}
    if body.stream:
        choice.update({"delta": {"role": "assistant", "content": pr.answer}} if chat else {"text": pr.answer})
        obj = "chat.completion.chunk" if chat else "text_completion"

        async def sse() -> AsyncIterator[str]:
            yield _sse(
                {"id": rid, "object": obj, "created": created, "model": pr.adapter, "choices": [choice]}
            )
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
    choice.update({"message": {"role": "assistant", "content": pr.answer}} if chat else {"text": pr.answer})
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": pr.adapter,
            "choices": [choice],
        }
    )
