"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, and vLLM's
/tokenize, /detokenize and /tokenizer_info (lm-evaluation-harness's remote tokenizer).

The adapter is the `model`. Each choice carries one extra object, `uncertainty`, that OpenAI clients ignore
(README "OpenAI-compatible API"); non-streaming responses also state it in `x-dalorra-*` headers
(server/headers.py), which LangChain passes on. A request with a `choices` list is multiple choice: it is answered
by /predict's path and its `uncertainty` is /predict's response. Completions take a string, token ids, or a list
of either (one choice per prompt and n, in order), and `echo` with `logprobs` returns the prompt tokens'
log-probabilities. Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}, request validation
errors included (OpenAIRoute). Routes only translate; the logic is in gen_service.py, the wire format in
openai_format.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError

from adapters.generation import GenerateRequest, GenerateResult

from .disconnect import until_disconnected
from .errors import ApiError
from .gen_service import GenerationService, ParamError, new_id, outcome_of
from .headers import uncertainty_headers
from .openai_format import (
    EventStream,
    chat_logprobs,
    completion_logprobs,
    echoed_logprobs,
    error_event,
    openai_error,
    sse,
    validation_error,
)
from .openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Common,
)
from .protocol import PredictItem
from .registry import AdapterRecord

log = logging.getLogger("dalorra.openai")
COUNTED = (
    "/v1/completions",
    "/v1/chat/completions",
)  # refusals counted in dalorra_*_requests_total


def generation_service(request: Request) -> GenerationService:
    """One GenerationService per Service (built on first use, after the lifespan has made the Service)."""
    svc = request.app.state.service
    g = getattr(request.app.state, "generation", None)
    if g is None or g.svc is not svc:
        g = request.app.state.generation = GenerationService(svc)
    return g


class OpenAIRoute(APIRoute):
    """Every refusal of these routes in OpenAI's error shape, request validation included, and counted once:
    a generation request in dalorra_generation_requests_total, a multiple-choice one (body with `choices`) in
    dalorra_requests_total, as /predict counts its items (unless the handler already counted it)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                resp = validation_error(exc)
            except ApiError as exc:
                resp = openai_error(exc)
            if request.url.path in COUNTED and not getattr(request.state, "counted", False):
                await _count_refusal(request, resp.status_code)
            return resp

        return run


async def _count_refusal(request: Request, status: int) -> None:
    svc = getattr(request.app.state, "service", None)
    if svc is None:
        return
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 (unreadable body: no model name to label with)
        body = None
    model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
    if isinstance(body, dict) and body.get("choices") is not None:
        label = svc.registry.label(model) if model else "unknown"
        svc.metrics.requests.labels(label, outcome_of(status)).inc()
    else:
        generation_service(request).count(model, outcome_of(status))


def _check(body: _Common) -> None:
    bad = body.unsupported()
    if bad:
        raise ParamError(
            422, "unsupported_parameter", f"not supported by this server: {', '.join(bad)}", bad[0]
        )


@dataclass(frozen=True)
class _Prompt:
    text: str  # what echo returns
    ids: list[int] | None  # its token ids, where they were needed (token-ID prompt, echo, max_tokens 0)
    req: GenerateRequest


def router() -> APIRouter:
    r = APIRouter(tags=["openai"], route_class=OpenAIRoute)

    @r.get("/v1/models", response_model=None)
    async def list_models(request: Request) -> dict:
        reg = request.app.state.service.registry
        return {"object": "list", "data": [_model_card(rec) for rec in reg.records()]}

    @r.get("/v1/models/{model}", response_model=None)
    async def get_model(model: str, request: Request) -> dict:
        if model not in request.app.state.service.registry:
            raise ParamError(404, "model_not_found", f"model {model!r} is not loaded", "model")
        return _model_card(request.app.state.service.registry.get(model))

    @r.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check(body)
        prompts = body.prompts()
        if body.choices is not None:
            if len(prompts) != 1 or not isinstance(prompts[0], str):
                raise ParamError(
                    422, "invalid_request", "multiple choice takes one prompt string (the question)", "prompt"
                )
            return await _multiple_choice(request, body, prompts[0], None, chat=False)
        g = generation_service(request)
        g.adapter(body.model)  # 404 / 503 before anything else
        if not prompts:
            raise ParamError(422, "invalid_request", "the prompt is empty", "prompt")
        if len(prompts) > g.s.max_items:
            raise ParamError(
                422,
                "invalid_request",
                f"{len(prompts)} prompts; at most {g.s.max_items} per request",
                "prompt",
            )
        planned = []  # every prompt checked before any is run
        for p in prompts:
            ids = None
            if not isinstance(p, str) or body.echo or body.max_tokens == 0:
                ids = g.prompt_ids(body.model, p)
            text = p if isinstance(p, str) else g.prompt_text(body.model, ids)
            req = g.plan(
                body.model,
                prompt=text,
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
            planned.append(_Prompt(text, ids, req))
        if body.stream:
            return await _stream(request, g, body, planned, chat=False)
        return await _completion(request, g, body, planned)

    @r.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check(body)
        try:
            messages = tuple(("system" if m.role == "developer" else m.role, m.text()) for m in body.messages)
        except ValueError as exc:
            raise ParamError(422, "invalid_request", f"messages: {exc}", "messages") from None
        if body.top_logprobs is not None and not body.logprobs:
            raise ParamError(422, "invalid_request", "top_logprobs needs logprobs=true", "top_logprobs")
        if body.choices is not None:
            users = [i for i, (role, _) in enumerate(messages) if role == "user"]
            if not users:
                raise ParamError(
                    422, "invalid_request", "multiple choice needs a user message (the question)", "messages"
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
        planned = [_Prompt("", None, req)]
        if body.stream:
            return await _stream(request, g, body, planned, chat=True)
        return await _chat(request, g, body, req)

    # ---- the tokenizer (vLLM's routes; lm-evaluation-harness's remote tokenizer) --------------------
    @r.post("/tokenize", response_model=None)
    async def tokenize(body: TokenizeRequest, request: Request) -> dict:
        g = generation_service(request)
        name = body.model or g.s.default_adapter
        g.adapter(name)
        if len(body.prompt) > g.s.max_question_chars * 4:
            raise ParamError(
                413, "too_long", f"prompt exceeds {g.s.max_question_chars * 4} characters", "prompt"
            )
        if not body.prompt:
            return {"count": 0, "max_model_len": g.s.max_prompt_tokens, "tokens": [], "token_strs": []}
        ids = g.token_ids(name, body.prompt, special=body.add_special_tokens)
        tok = g.tokenizer(name)
        return {
            "count": len(ids),
            "max_model_len": g.s.max_prompt_tokens,
            "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids),
        }

    @r.post("/detokenize", response_model=None)
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
        g = generation_service(request)
        name = body.model or g.s.default_adapter
        g.adapter(name)
        if len(body.tokens) > g.s.max_prompt_tokens:
            raise ParamError(
                422,
                "invalid_request",
                f"{len(body.tokens)} tokens; at most {g.s.max_prompt_tokens}",
                "tokens",
            )
        g.check_ids(name, body.tokens, "tokens")
        return {"prompt": g.prompt_text(name, list(body.tokens))}

    @r.get("/tokenizer_info", response_model=None)
    async def tokenizer_info(request: Request) -> dict:
        g = generation_service(request)
        name = g.s.default_adapter
        g.adapter(name)
        tok = g.tokenizer(name)
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": g.s.max_prompt_tokens,
        }

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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _done(request: Request, g: GenerationService, model: str, outcome: str) -> None:
    request.state.counted = True
    g.count(model, outcome)


async def _completion(
    request: Request, g: GenerationService, body: CompletionRequest, planned: list[_Prompt]
) -> JSONResponse:
    """Prompts one after another (each in its own generation slot); n choices per prompt, index i·n + j."""
    rid, created = new_id("cmpl"), int(time.time())
    choices: list[dict] = []
    prompt_tokens = completion_tokens = 0
    for i, p in enumerate(planned):
        echo = None
        if body.echo and body.logprobs is not None:
            echo = await until_disconnected(request, g.score_prompt(body.model, p.ids, body.logprobs))
        res = await until_disconnected(request, g.generate(p.req)) if p.req.max_tokens > 0 else None
        prompt_tokens += res.prompt_tokens if res is not None else len(p.ids)
        for j in range(body.n):
            c = res.choices[j] if res is not None else None
            completion_tokens += len(c.token_ids) if c is not None else 0
            lp = None
            if body.logprobs is not None:
                lp = echoed_logprobs(echo, c, len(p.text) if body.echo else 0)
            choices.append(
                {
                    "index": i * body.n + j,
                    "text": (p.text if body.echo else "") + (c.text if c is not None else ""),
                    "logprobs": lp,
                    "finish_reason": c.finish_reason if c is not None else "length",
                    "uncertainty": _uncertainty(g, body, res, j, p.req),
                }
            )
    _done(request, g, body.model, "ok")
    out = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
    }
    return JSONResponse(out, headers=uncertainty_headers([c["uncertainty"] for c in choices]))


def _uncertainty(
    g: GenerationService, body: _Common, res: GenerateResult | None, i: int, req: GenerateRequest
) -> dict | None:
    if res is None:
        return None
    return g.uncertainty(req, res, i, body.min_confidence, body.max_epistemic)


async def _chat(
    request: Request, g: GenerationService, body: ChatCompletionRequest, req: GenerateRequest
) -> JSONResponse:
    rid, created = new_id("chatcmpl"), int(time.time())
    res = await until_disconnected(request, g.generate(req))  # a client that leaves stops the decoding
    choices = []
    for i, c in enumerate(res.choices):
        lp = None
        if c.logprobs is not None:
            lp = chat_logprobs(c.tokens, c.logprobs, c.top_logprobs)
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": lp,
                "finish_reason": c.finish_reason,
                "uncertainty": _uncertainty(g, body, res, i, req),
            }
        )
    _done(request, g, body.model, "ok")
    done = sum(len(c.token_ids) for c in res.choices)
    out = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": req.adapter,
        "choices": choices,
        "usage": _usage(res.prompt_tokens, done),
    }
    return JSONResponse(out, headers=uncertainty_headers([c["uncertainty"] for c in choices]))


async def _stream(
    request: Request, g: GenerationService, body: _Common, planned: list[_Prompt], chat: bool
) -> EventStream:
    """Server-sent events. The first event is computed before the response starts, so a bad prompt or a full
    server is still an HTTP error; a failure after that is an error event and [DONE], never a cut stream."""
    rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    n = body.n

    def chunk(choices: list[dict], **extra: object) -> str:
        return sse(
            {"id": rid, "object": obj, "created": created, "model": body.model, "choices": choices, **extra}
        )

    def piece(index: int, text: str, lp: dict | None, finish: str | None = None, **extra: object) -> dict:
        c = {"index": index, "logprobs": lp, "finish_reason": finish, **extra}
        c.update({"delta": {"content": text} if text or finish is None else {}} if chat else {"text": text})
        return c

    async def produce() -> AsyncIterator[str]:
        usage = [0, 0]  # prompt, completion tokens over every prompt
        last: list[dict] = []
        started = counted = False
        try:
            for i, p in enumerate(planned):
                offsets = [0] * n
                if not chat and body.echo:
                    lp = None
                    if body.logprobs is not None:
                        echo = await g.score_prompt(body.model, p.ids, body.logprobs)
                        lp = echoed_logprobs(echo, None, 0)
                    started = True
                    yield chunk([piece(i * n + j, p.text, lp) for j in range(n)])
                    offsets = [len(p.text)] * n
                if p.req.max_tokens == 0:
                    usage[0] += len(p.ids)
                    last += [piece(i * n + j, "", None, "length", uncertainty=None) for j in range(n)]
                    continue
                events = g.events(p.req, stream=True)
                try:
                    ev = await events.__anext__()
                    if chat and not started:
                        started = True
                        role = {"role": "assistant", "content": ""}
                        yield chunk(
                            [
                                {"index": j, "delta": role, "logprobs": None, "finish_reason": None}
                                for j in range(n)
                            ]
                        )
                    while ev[0] != "done":
                        _, j, text, info = ev
                        if text or info:
                            lp = None
                            if info is not None:
                                if chat:
                                    lp = chat_logprobs([info["token"]], [info["logprob"]], [info["top"]])
                                else:
                                    lp = completion_logprobs(
                                        [info["token"]], [info["logprob"]], [info["top"]], offsets[j]
                                    )
                                offsets[j] += len(info["token"])
                            started = True
                            yield chunk([piece(i * n + j, text, lp)])
                        ev = await events.__anext__()
                finally:
                    await events.aclose()  # a disconnected client: the decoding stops and its slot is freed
                res: GenerateResult = ev[1]
                usage[0] += res.prompt_tokens
                usage[1] += sum(len(c.token_ids) for c in res.choices)
                for j, c in enumerate(res.choices):
                    last.append(
                        piece(
                            i * n + j,
                            "",
                            None,
                            c.finish_reason,
                            uncertainty=_uncertainty(g, body, res, j, p.req),
                        )
                    )
            g.count(body.model, "ok")
            counted = True
            # the final chunk: finish reasons, uncertainty and usage
            yield chunk(last, usage=_usage(*usage))
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            if not started:
                raise  # before the first event: the route answers it as an HTTP error
            g.count(body.model, outcome_of(exc.status))
            yield error_event(exc)
        except Exception:
            if not started:
                raise
            log.exception("stream failed for adapter %s", body.model)
            g.count(body.model, "error")
            yield error_event(ApiError(500, "internal_error", "the stream failed; see the server log"))
        except BaseException:  # GeneratorExit, CancelledError: the client left or the server stopped it
            if not counted:
                g.count(body.model, "cancelled")
            raise

    gen = produce()
    first = await gen.__anext__()
    request.state.counted = True  # the stream counts its own outcome from here on

    async def chained() -> AsyncIterator[str]:
        yield first
        async for x in gen:
            yield x

    return EventStream(chained(), on_cancel=gen.aclose)


async def _multiple_choice(
    request: Request, body: _Common, question: str, context: str | None, chat: bool
) -> JSONResponse | EventStream:
    """Answer by scoring the listed choices, exactly as POST /predict does; `uncertainty` is its response."""
    if body.n != 1:
        raise ParamError(422, "invalid_request", "multiple choice returns one answer: n must be 1", "n")
    if body.samples == 0:
        raise ParamError(422, "invalid_request", "multiple choice needs samples >= 1", "samples")
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
        e = exc.errors()[0]
        raise ParamError(
            422, "invalid_request", str(e.get("msg")), ".".join(map(str, e.get("loc", ())))
        ) from None
    svc = request.app.state.service
    request.state.counted = True  # /predict's path counts this item, refused or answered
    pr = (await until_disconnected(request, svc.predict([item])))[0]
    rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    unc = {"kind": "multiple_choice", **pr.model_dump()}
    usage = _usage(
        generation_service(request).count_tokens(pr.adapter, [question, item.context or "", *item.choices]), 0
    )
    choice = {"index": 0, "logprobs": None, "finish_reason": "stop", "uncertainty": unc}
    obj = "chat.completion.chunk" if chat else "text_completion"
    if body.stream:
        choice.update({"delta": {"role": "assistant", "content": pr.answer}} if chat else {"text": pr.answer})

        async def events() -> AsyncIterator[str]:
            yield sse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": pr.adapter,
                    "choices": [choice],
                    "usage": usage,
                }
            )
            yield "data: [DONE]\n\n"

        return EventStream(events())
    choice.update({"message": {"role": "assistant", "content": pr.answer}} if chat else {"text": pr.answer})
    out = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": pr.adapter,
        "choices": [choice],
        "usage": usage,
    }
    return JSONResponse(out, headers=uncertainty_headers([unc]))
