"""Serving logic for generated answers: validate → admit → take a slot → backend.generate in a worker thread →
summarise the uncertainty → decide → count. Apart from the FastAPI glue (server/openai_api.py).

A generation is admitted by the one scheduler (server/scheduler.py) as its estimated rows (decoding plus the
uncertainty pass, adapters.generate.work_rows): too large for the queue → 413, queue full → 429. GENERATION_SLOTS
worker threads decode at once and up to GENERATION_QUEUE requests wait for a slot (more get 429). Every forward of
a generation — each decoding step, each bounded piece of the uncertainty pass — is a turn of the scheduler, so
/predict batches interleave with a long generation. A request whose client leaves (stream or not) sets its cancel
flag; the worker stops at its next piece and the slot and rows are free again.

Echo with log-probabilities (lm-evaluation-harness's loglikelihood) scores the prompt's own tokens with
`backend.prompt_logprobs` in one scheduler turn, under the mean-mask network that also decodes. Outcomes are
counted once per HTTP request by the routes (`count`); tokens when a worker returns, cancelled ones included.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from adapters.generate import ROW_TOKENS, work_rows
from adapters.generation import (
    GenerateRequest,
    GenerateResult,
    generation_policy,
    request_settings,
    summarize_answer,
)

from .backend import BackendError, PromptLogprobs
from .errors import ApiError
from .generation import GenerationUnsupported
from .scheduler import ShuttingDown
from .service import not_unicode

if TYPE_CHECKING:
    from .registry import AdapterRecord
    from .service import Service

log = logging.getLogger("dalorra.generation")
T = TypeVar("T")
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; lm-eval's `until` plus its EOS can need more)
# dalorra_generation_requests_total outcome of a refused or failed request, by HTTP status
OUTCOMES = {429: "rejected", 499: "cancelled", 501: "unsupported", 503: "unavailable", 504: "timeout"}


def outcome_of(status: int) -> str:
    return OUTCOMES.get(status, "error" if status >= 500 else "invalid")


class ParamError(ApiError):
    """A refusal that names the request field at fault (OpenAI's error `param`)."""

    def __init__(self, status: int, type_: str, message: str, param: str | None, code: str | None = None):
        super().__init__(status, type_, message)
        self.param, self.code = param, code or type_


def _text_check(field: str, text: str) -> None:
    if not_unicode(text):
        raise ParamError(
            422,
            "invalid_text",
            f"{field} contains a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text: "
            "send valid UTF-8",
            field,
        )


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

    def tokenizer(self, adapter: str) -> Any:
        """The adapter's tokenizer, or 501 when the backend exposes none."""
        tok = self.svc.backend.tokenizer(adapter)
        if tok is None:
            raise ApiError(
                501, "not_implemented", f"the {self.svc.backend.name} backend does not expose its tokenizer"
            )
        return tok

    def token_ids(self, adapter: str, text: str, special: bool = False) -> list[int]:
        """Text → token ids with the adapter's tokenizer (special=True: its special tokens added, as
        generation's prompts); a lone surrogate is a 422."""
        _text_check("prompt", text)
        return list(self.tokenizer(adapter)(text, add_special_tokens=special).input_ids)

    def check_ids(self, adapter: str, ids: list[int], param: str) -> None:
        size = len(self.tokenizer(adapter))
        if ids and max(ids) >= size:
            raise ParamError(
                422, "invalid_request", f"token id {max(ids)} is outside the vocabulary (size {size})", param
            )

    def prompt_ids(self, adapter: str, prompt: str | list[int]) -> list[int]:
        """A completion prompt's token ids: text as generation tokenizes it (the tokenizer's special tokens
        added), token ids checked against the vocabulary; empty or over DALORRA_MAX_PROMPT_TOKENS is a 422."""
        if isinstance(prompt, str):
            ids = self.token_ids(adapter, prompt, special=True)
        else:
            ids = list(prompt)
            self.check_ids(adapter, ids, "prompt")
        if not ids:
            raise ParamError(422, "invalid_request", "the prompt is empty", "prompt")
        if len(ids) > self.s.max_prompt_tokens:
            raise ParamError(
                422,
                "invalid_request",
                f"prompt is {len(ids)} tokens; at most {self.s.max_prompt_tokens} (DALORRA_MAX_PROMPT_TOKENS)",
                "prompt",
            )
        return ids

    def count_tokens(self, adapter: str, texts: list[str]) -> int:
        """Tokens of these texts by the adapter's tokenizer; without one (a backend that exposes none), an
        estimate of one token per 4 characters (README: `usage` of multiple-choice replies)."""
        tok = self.svc.backend.tokenizer(adapter)
        if tok is None:
            return sum(math.ceil(len(t) / 4) for t in texts)
        return sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts if t)

    def prompt_text(self, adapter: str, ids: list[int]) -> str:
        """Token ids as text (generation re-tokenizes it; for SmolLM2's tokenizer the round trip is exact)."""
        return self.tokenizer(adapter).decode(ids, skip_special_tokens=False)

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
            raise ParamError(
                422,
                "invalid_request",
                f"max_tokens={max_tokens} exceeds the limit {s.max_tokens}",
                "max_tokens",
            )
        if n > s.max_n:
            raise ParamError(422, "invalid_request", f"n={n} exceeds the limit {s.max_n}", "n")
        if len(stop) > MAX_STOPS or any(not x for x in stop):
            raise ParamError(422, "invalid_request", f"stop: at most {MAX_STOPS} non-empty strings", "stop")
        if prompt is not None:
            _text_check("prompt", prompt)
        for i, (_, c) in enumerate(messages or ()):
            _text_check(f"messages.{i}.content", c)
        text = prompt if prompt is not None else "".join(c for _, c in messages)
        if (
            len(text) > s.max_question_chars * 4
        ):  # a cheap bound before tokenising; tokens are checked exactly
            raise ParamError(
                413, "too_long", f"prompt exceeds {s.max_question_chars * 4} characters", "prompt"
            )
        samples = samples if samples is not None else (rec.default_samples or s.default_samples)
        if samples > s.max_samples:
            raise ParamError(
                422, "invalid_request", f"samples={samples} exceeds the limit {s.max_samples}", "samples"
            )
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
        self.svc.admit(rows, None)
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
        fut.add_done_callback(lambda f: self._count_tokens(req.adapter, f))
        fut.add_done_callback(lambda f: queue.put_nowait(("done", f)))
        finished, first, t0 = False, True, time.perf_counter()
        try:
            while True:
                ev = await queue.get()
                if ev[0] == "done":
                    finished = True
                    yield ("done", self._result(req, ev[1]))
                    return
                if first and ev[2]:
                    first = False
                    self.metrics.gen_ttft.labels(req.adapter).observe(time.perf_counter() - t0)
                yield ev
        finally:
            if not finished:
                cancel.set()  # the decoding loop stops at its next step

    def _count_tokens(self, adapter: str, fut: asyncio.Future) -> None:
        """Prompt and generated tokens of every generation that returned, a cancelled one's included (its
        result holds the tokens decoded before it stopped)."""
        if fut.cancelled() or fut.exception() is not None:
            return
        res: GenerateResult = fut.result()
        self.metrics.gen_prompt_tokens.labels(adapter).inc(res.prompt_tokens)
        tokens = sum(len(c.token_ids) for c in res.choices)
        self.metrics.gen_tokens.labels(adapter).inc(tokens)
        if tokens:
            self.metrics.gen_tpot.labels(adapter).observe(
                res.decode_seconds / max(1, tokens // len(res.choices))
            )

    def _result(self, req: GenerateRequest, fut: asyncio.Future) -> GenerateResult:
        try:
            return fut.result()
        except GenerationUnsupported as exc:
            raise ApiError(501, "not_implemented", str(exc)) from None
        except ShuttingDown:
            raise self.svc.unavailable() from None
        except BackendError as exc:  # the prompt (too long, empty, no chat template) or an unloaded adapter
            param = ("messages" if req.messages is not None else "prompt") if "prompt" in str(exc) else None
            raise ParamError(422, "invalid_request", str(exc), param) from None
        except Exception:
            log.exception("generation failed for adapter %s", req.adapter)
            raise ApiError(500, "internal_error", "generation failed; see the server log") from None

    # ---- prompt log-probabilities (echo) ---------------------------------------------------------
    async def score_prompt(self, adapter: str, ids: list[int], top_k: int) -> PromptLogprobs:
        """backend.prompt_logprobs in a worker thread, its forward one turn of the scheduler; admitted and
        slotted like a generation. A caller that leaves does not stop the one forward; its rows and slot are
        released when the worker returns."""
        rows = math.ceil(1.3 * len(ids) / ROW_TOKENS)
        out = await self._in_slot(
            adapter, rows, self.svc.backend.prompt_logprobs, adapter, ids, top_k, self.svc.scheduler.gate
        )
        self.metrics.echo_tokens.labels(adapter).inc(len(ids))
        return out

    async def _in_slot(self, adapter: str, rows: int, fn: Callable[..., T], *args: object) -> T:
        self.svc.admit(rows, None)
        try:
            await self._acquire(adapter)
        except BaseException:
            self.svc.scheduler.release(rows)
            raise
        self.svc.registry.busy[adapter] += 1

        def done(_: object = None) -> None:
            self.svc.scheduler.release(rows)
            self.svc.registry.busy[adapter] -= 1

        try:
            fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BaseException:
            self._release()
            done()
            raise
        fut.add_done_callback(self._release)
        fut.add_done_callback(done)
        try:
            return await asyncio.shield(fut)
        except GenerationUnsupported as exc:
            raise ApiError(501, "not_implemented", str(exc)) from None
        except ShuttingDown:
            raise self.svc.unavailable() from None
        except BackendError as exc:
            raise ParamError(422, "invalid_request", str(exc), "prompt") from None
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("scoring the prompt failed for adapter %s", adapter)
            raise ApiError(500, "internal_error", "scoring the prompt failed; see the server log") from None

    # ---- counting -------------------------------------------------------------------------------
    def count(self, model: str | None, outcome: str) -> None:
        """One generation request's outcome in dalorra_generation_requests_total (a name that is not loaded, or
        none could be read, counts as "unknown": labels stay bounded)."""
        label = self.svc.registry.label(model) if model else "unknown"
        self.metrics.gen_requests.labels(label, outcome).inc()

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        async for ev in self.events(req, stream=False):
            if ev[0] == "done":
                return ev[1]
        raise RuntimeError("generation ended without a result")

    # ---- uncertainty and decision ---------------------------------------------------------------
    def uncertainty(
        self,
        req: GenerateRequest,
        res: GenerateResult,
        i: int,
        min_confidence: float | None,
        max_epistemic: float | None,
    ) -> dict | None:
        """The per-choice extra object (None when the uncertainty pass was skipped). The adapter's generation
        policy (adapters/decision.py) decides, after checking that the request's settings are those its thresholds
        were fitted with (else reason not_calibrated_for_settings); a request's threshold overrides make it an
        uncertified policy."""
        c = res.choices[i]
        if c.scores is None:
            return None
        adapter = req.adapter
        summ = summarize_answer(c.scores)
        th = self.svc.registry.get(adapter).generation  # read and checked once, when the adapter loaded
        src = th.source
        policy = th.policy
        if min_confidence is not None or max_epistemic is not None:
            src = "request"
            policy = generation_policy(th.record, min_confidence, max_epistemic)
        # A raw completion prompt counts as the form the thresholds were fitted with (the server cannot tell how
        # its text was written); a chat-templated prompt is another form. Decoding, length and S are compared.
        fitted_form = (policy.settings or {}).get("prompt", "raw prompt")
        form = "chat template" if req.messages is not None else fitted_form
        settings = request_settings(req, form)
        u = policy.unfamiliarity(summ["epistemic_mean"], summ["entropy_mean"])
        reason = policy.decide(summ["confidence"], summ["epistemic_mean"], u, settings=settings)
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
            "unfamiliarity": u,
            "per_token": {
                "tokens": c.tokens,
                "entropy": [round(float(x), 6) for x in sc.entropy],
                "epistemic": [round(float(x), 8) for x in sc.epistemic],
                "logprob": [round(float(x), 6) for x in sc.mean_logprobs],
            },
            "decision": "abstain" if reason else "answer",
            "abstain_reason": reason,
            "thresholds": {
                "min_confidence": policy.min_confidence,
                "max_epistemic": policy.max_epistemic,
                "source": src,
                "certified": policy.certified,
                "settings_mismatch": policy.settings_mismatch(settings) or None,
            },
        }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
