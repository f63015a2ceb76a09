"""Serving logic for generated answers: validate → admit → take a slot → backend.generate in a worker thread →
summarise the uncertainty → decide → count. Apart from the FastAPI glue (server/openai_api.py).

A generation is admitted by the one scheduler (server/scheduler.py) as its estimated rows (decoding plus the
uncertainty pass, adapters.generate.work_rows): too large for the queue → 413, queue full → 429. GENERATION_SLOTS
worker threads decode at once and up to GENERATION_QUEUE requests wait for a slot (more get 429). Every forward of
a generation — each decoding step, each bounded piece of the uncertainty pass — is a turn of the scheduler, so
/predict batches interleave with a long generation. A request whose client leaves (stream or not) sets its cancel
flag; the worker stops at its next piece and the slot and rows are free again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from adapters.generate import work_rows
from adapters.generation import GenerateRequest, GenerateResult, decide, summarize_answer

from .backend import BackendError
from .errors import ApiError
from .generation import GenerationUnsupported

if TYPE_CHECKING:
    from .registry import AdapterRecord
    from .service import Service

log = logging.getLogger("dalorra.generation")


class GenerationService:
    def __init__(self, svc: Service):
        self.svc, self.s, self.metrics = svc, svc.s, svc.metrics
        self.busy = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(self.s.generation_slots)
        self._pool = ThreadPoolExecutor(max_workers=self.s.generation_slots, thread_name_prefix="dalorra-gen")

    # ---- validation -----------------------------------------------------------------------------
    def adapter(self, name: str) -> AdapterRecord:
        """The loaded adapter's record, or the same 404s as /predict (OpenAI's names), or 503 while starting."""
        reg = self.svc.registry
        if name not in reg:
            if name in reg.available():
                raise ApiError(
                    404,
                    "adapter_not_loaded",
                    f"model {name!r} exists but is not loaded; POST /v1/adapters/{name}/load",
                )
            raise ApiError(404, "model_not_found", f"unknown model {name!r}; see GET /v1/models")
        if not self.svc.accepting:
            raise self.svc.unavailable()
        return reg.get(name)

    def plan(
        self,
        adapter: str,
        *,
        prompt: str | None = None,
        messages: tuple[tuple[str, str], ...] | None = None,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        stop: tuple[str, ...],
        seed: int | None,
        n: int,
        top_logprobs: int | None,
        samples: int | None,
        mask_seed: int | None,
        ignore_eos: bool = False,
    ) -> GenerateRequest:
        s = self.s
        rec = self.adapter(adapter)
        max_tokens = s.max_tokens if max_tokens is None else max_tokens
        if max_tokens > s.max_tokens:
            raise ApiError(
                422, "invalid_request", f"max_tokens={max_tokens} exceeds the limit {s.max_tokens}"
            )
        if n > s.max_n:
            raise ApiError(422, "invalid_request", f"n={n} exceeds the limit {s.max_n}")
        if len(stop) > 4 or any(not x for x in stop):
            raise ApiError(422, "invalid_request", "stop: at most 4 non-empty strings")
        text = prompt if prompt is not None else "".join(c for _, c in messages)
        if (
            len(text) > s.max_question_chars * 4
        ):  # a cheap bound before tokenising; tokens are checked exactly
            raise ApiError(413, "too_long", f"prompt exceeds {s.max_question_chars * 4} characters")
        samples = samples if samples is not None else (rec.default_samples or s.default_samples)
        if samples > s.max_samples:
            raise ApiError(422, "invalid_request", f"samples={samples} exceeds the limit {s.max_samples}")
        return GenerateRequest(
            adapter=adapter,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            n=n,
            top_logprobs=top_logprobs,
            samples=samples,
            mask_seed=0 if mask_seed is None else mask_seed,
            ignore_eos=ignore_eos,
        )

    # ---- running --------------------------------------------------------------------------------
    async def _acquire(self, adapter: str) -> None:
        if self._slots.locked():
            if self.waiting >= self.s.generation_queue:
                self.metrics.gen_requests.labels(adapter, "rejected").inc()
                raise ApiError(
                    429,
                    "overloaded",
                    f"{self.s.generation_slots} generations running and {self.waiting} waiting; retry later",
                    {"Retry-After": "2"},
                )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.busy += 1
        self.metrics.gen_slots.set(self.busy)

    def _release(self, fut: asyncio.Future[GenerateResult] | None = None) -> None:
        if fut is not None and not fut.cancelled():
            fut.exception()  # retrieved here (a cancelled stream never reads it), so asyncio does not warn
        self.busy -= 1
        self.metrics.gen_slots.set(self.busy)
        self._slots.release()

    def rows(self, req: GenerateRequest) -> int:
        """The request's cost in scheduler rows (its prompt's tokens estimated from characters: ≥ 1 per 3)."""
        text = req.prompt if req.prompt is not None else "".join(c for _, c in req.messages or ())
        return work_rows(len(text) // 3 + 16, req.max_tokens, req.n, req.samples)

    async def events(self, req: GenerateRequest, stream: bool) -> AsyncIterator[tuple]:
        """("token", index, text, info) while decoding (stream=True only), then ("done", GenerateResult).

        Leaving the iterator early (the client went away) cancels the decoding; the slot and the admitted rows
        are released when the worker thread actually returns."""
        rows = self.rows(req)
        try:
            self.svc.admit(rows, None)
        except ApiError as exc:
            self.metrics.gen_requests.labels(
                req.adapter, "rejected" if exc.status == 429 else "invalid"
            ).inc()
            raise
        try:
            await self._acquire(req.adapter)
        except BaseException:
            self.svc.scheduler.release(rows)
            raise
        self.svc.registry.busy[req.adapter] += 1
        released = False

        def release_rows(_: object = None) -> None:
            nonlocal released
            if not released:
                released = True
                self.svc.scheduler.release(rows)
                self.svc.registry.busy[req.adapter] -= 1

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def on_token(i: int, text: str, info: dict | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("token", i, text, info))

        try:
            fut = loop.run_in_executor(
                self._pool,
                self.svc.backend.generate,
                req,
                on_token if stream else None,
                cancel.is_set,
                self.svc.scheduler.gate,
            )
        except BaseException:
            self._release()
            release_rows()
            raise
        fut.add_done_callback(self._release)
        fut.add_done_callback(release_rows)
        fut.add_done_callback(lambda f: queue.put_nowait(("done", f)))
        finished = False
        try:
            while True:
                ev = await queue.get()
                if ev[0] == "done":
                    finished = True
                    yield ("done", self._result(req, ev[1]))
                    return
                yield ev
        finally:
            if not finished:
                cancel.set()  # the decoding loop stops at its next step
                self.metrics.gen_requests.labels(req.adapter, "cancelled").inc()

    def _result(self, req: GenerateRequest, fut: asyncio.Future) -> GenerateResult:
        try:
            res = fut.result()
        except GenerationUnsupported as exc:
            self.metrics.gen_requests.labels(req.adapter, "unsupported").inc()
            raise ApiError(501, "not_implemented", str(exc)) from None
        except BackendError as exc:
            self.metrics.gen_requests.labels(req.adapter, "invalid").inc()
            raise ApiError(422, "invalid_request", str(exc)) from None
        except Exception:
            log.exception("generation failed for adapter %s", req.adapter)
            self.metrics.gen_requests.labels(req.adapter, "error").inc()
            raise ApiError(500, "internal_error", "generation failed; see the server log") from None
        m = self.metrics
        m.gen_requests.labels(req.adapter, "ok").inc()
        m.gen_prompt_tokens.labels(req.adapter).inc(res.prompt_tokens)
        m.gen_tokens.labels(req.adapter).inc(sum(len(c.token_ids) for c in res.choices))
        return res

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        async for ev in self.events(req, stream=False):
            if ev[0] == "done":
                return ev[1]
        raise RuntimeError("generation ended without a result")

    # ---- uncertainty and decision ---------------------------------------------------------------
    def uncertainty(
        self,
        adapter: str,
        res: GenerateResult,
        i: int,
        min_confidence: float | None,
        max_epistemic: float | None,
    ) -> dict | None:
        """The per-choice extra object (None when the uncertainty pass was skipped)."""
        c = res.choices[i]
        if c.scores is None:
            return None
        summ = summarize_answer(c.scores)
        th = self.svc.registry.get(adapter).generation  # read and checked once, when the adapter loaded
        conf_t, epi_t, src = th.min_confidence, th.max_epistemic, th.source
        if min_confidence is not None or max_epistemic is not None:
            src = "request"
            conf_t = min_confidence if min_confidence is not None else conf_t
            epi_t = max_epistemic if max_epistemic is not None else epi_t
        reason = decide(summ, conf_t, epi_t)
        m = self.metrics
        m.gen_confidence.labels(adapter).observe(summ["confidence"])
        m.gen_epistemic.labels(adapter).observe(summ["epistemic_mean"])
        if reason:
            m.gen_abstentions.labels(adapter, reason).inc()
        sc = c.scores
        return {
            "kind": "generation",
            "samples": res.samples,
            "decoding": "mean-mask network (z = E[z])",
            **summ,
            "per_token": {
                "tokens": c.tokens,
                "entropy": [round(float(x), 6) for x in sc.entropy],
                "epistemic": [round(float(x), 8) for x in sc.epistemic],
                "logprob": [round(float(x), 6) for x in sc.mean_logprobs],
            },
            "decision": "abstain" if reason else "answer",
            "abstain_reason": reason,
            "thresholds": {"min_confidence": conf_t, "max_epistemic": epi_t, "source": src},
        }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
