"""Serving logic, apart from the FastAPI glue: validate → batch → reduce → decide → sign → count."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import unicodedata
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from adapters.decision import FIXED_SEED, adaptive_rounds
from adapters.uncertainty import sampling_settled, softmax, summarize

from .backend import Backend, BackendError, Scored, ScoreRequest
from .errors import ApiError
from .metrics import Metrics
from .protocol import FeedbackRequest, FeedbackResponse, PredictItem, PredictResponse
from .receipts import ReceiptError, ReceiptInvalid, Receipts
from .registry import AdapterRecord, Registry
from .scheduler import BatchFailed, Overloaded, Scheduler, ShuttingDown, TooLarge

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("dalorra.service")
PUBLIC_KEYS = frozenset({"dev-only-change-me", "change-me-please"})  # published in old docs and compose files
ADMISSION_MARGIN = 0.8  # admit only work whose estimated finish is within this share of the request deadline
# dalorra_requests_total outcome of a failed /predict, by HTTP status (429 and 504 keep their old names)
OUTCOMES = {429: "rejected", 504: "timeout", 503: "unavailable"}


@dataclass(frozen=True)
class Plan:
    """One validated item: where it goes, and the adapter record it was admitted under. Temperature and
    thresholds come from this record, not from a later lookup, so an unload or reload while the item is
    being scored cannot mix one adapter's scores with another's (or no) decision rule."""

    adapter: str
    samples: int
    seed: int
    record: AdapterRecord


def blank(text: str) -> bool:
    """Nothing a reader could see: whitespace, control and format characters only (zero-width spaces are Cf)."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


def not_unicode(text: str) -> bool:
    """Lone surrogates are valid JSON escapes but not text: the tokenizer cannot encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class Service:
    """The /predict path and feedback. Adapters are the registry's; the model's time is the scheduler's."""

    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics):
        self.s, self.backend, self.metrics = settings, backend, metrics
        self.receipts = Receipts(feedback_key(settings.feedback_key), settings.receipt_ttl_s)
        self.registry = Registry(settings, backend, metrics)
        self.scheduler = Scheduler(
            backend,
            settings.max_batch_rows,
            settings.max_wait_ms,
            settings.max_queue_rows,
            on_batch=metrics.observe_batch,
            on_queue=metrics.queue_depth.set,
        )
        self.accepting = False
        # Results of seeded requests: (adapter, load generation, request fields) → logits. A reload bumps
        # the generation, so stale entries are never served; LRU-bounded by RESULT_CACHE_SIZE.
        self.cache: OrderedDict[tuple, Scored] = OrderedDict()
        self.active = 0  # /predict calls in progress (stop() waits for them)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the scheduler and load the default and preloaded adapters. An adapter that cannot be loaded is
        skipped with a log line and the others serve (readiness needs at least one)."""
        self.scheduler.start()
        for name in dict.fromkeys([self.s.default_adapter, *self.s.preload]):
            if name and name not in self.registry:
                try:
                    await self.registry.load(name)
                except ApiError as exc:
                    log.error("adapter %s skipped at start: %s", name, exc.message)
        await self._measure_rate()
        self.accepting = True
        self.metrics.ready.set_function(
            lambda: 1.0 if self.ready() else 0.0
        )  # exactly what /health/ready says

    async def _measure_rate(self) -> None:
        """One small scoring call before serving, so admission knows the drain rate from the first request."""
        recs = self.registry.records()
        if not recs:
            return
        req = ScoreRequest(
            recs[0].name, "Which one is measured?", ("this one", "that one"), None, 2, FIXED_SEED
        )
        try:
            await asyncio.wait_for(self.scheduler.submit(req), self.s.request_timeout_s)
        except Exception as exc:  # admission then starts without a rate, as before
            log.warning("could not measure the scoring rate at start: %s", exc)

    def ready(self) -> bool:
        return self.accepting and bool(self.registry.names()) and self.backend.ready()

    async def stop(self, drain_s: float = 30.0) -> None:
        self.accepting = False
        # Accepted requests finish first: an adaptive request is between rounds (neither queued nor in
        # flight) for a moment, so the scheduler's own counters alone could look idle too early.
        end = time.perf_counter() + drain_s
        while self.active > 0 and time.perf_counter() < end:
            await asyncio.sleep(0.05)
        await self.scheduler.drain(max(0.0, end - time.perf_counter()))
        await self.scheduler.close()
        self.backend.shutdown()

    def unavailable(self) -> ApiError:
        return ApiError(
            503,
            "unavailable",
            "server is not accepting requests (starting or draining)",
            {"Retry-After": "5"},
        )

    def admit(self, rows: int, deadline_s: float | None) -> None:
        """Reserve rows in the scheduler for a whole request, or the 413/429/503 a client should see."""
        try:
            self.scheduler.admit(rows, deadline_s)
        except TooLarge as exc:
            raise ApiError(413, "too_large", str(exc)) from None
        except Overloaded as exc:
            raise ApiError(
                429, "overloaded", str(exc), {"Retry-After": str(int(np.ceil(exc.retry_after)))}
            ) from None
        except ShuttingDown:
            raise ApiError(503, "unavailable", "server is shutting down", {"Retry-After": "5"}) from None

    # ---- predict --------------------------------------------------------------------------------
    def _validate(self, item: PredictItem) -> Plan:
        s = self.s
        rec = self.registry.get(item.adapter)
        name = rec.name
        for field, text in (
            ("question", item.question),
            ("context", item.context or ""),
            *((f"choices.{i}", c) for i, c in enumerate(item.choices)),
        ):
            if not_unicode(text):
                raise ApiError(
                    422,
                    "invalid_text",
                    f"{field} contains a lone surrogate (an unpaired \\ud800-"
                    "\\udfff escape), which is not text: send valid UTF-8",
                )
        if blank(item.question):
            raise ApiError(422, "invalid_request", "question is empty (only spaces or invisible characters)")
        if len(item.question) + len(item.context or "") > s.max_question_chars:
            raise ApiError(413, "too_long", f"question + context exceed {s.max_question_chars} characters")
        for i, c in enumerate(item.choices):
            if blank(c):
                raise ApiError(
                    422, "invalid_request", f"choice {i} is empty (only spaces or invisible characters)"
                )
            if len(c) > s.max_choice_chars:
                raise ApiError(413, "too_long", f"choice {i} exceeds {s.max_choice_chars} characters")
        samples = item.samples or rec.default_samples or s.default_samples
        if samples > s.max_samples:
            raise ApiError(422, "invalid_request", f"samples={samples} exceeds the limit {s.max_samples}")
        if item.fresh and item.seed is not None:
            raise ApiError(422, "invalid_request", "give either seed or fresh=true, not both")
        seed = (
            item.seed
            if item.seed is not None
            else (int.from_bytes(uuid.uuid4().bytes[:4], "big") if item.fresh else FIXED_SEED)
        )
        return Plan(name, samples, seed, rec)

    async def predict(self, items: list[PredictItem]) -> list[PredictResponse]:
        """Every outcome is counted in dalorra_requests_total (per item, by adapter when it is loaded)."""
        self.active += 1
        try:
            return await self._predict(items)
        except ApiError as exc:
            self._count_failure(items, OUTCOMES.get(exc.status, "error" if exc.status >= 500 else "invalid"))
            raise
        except asyncio.CancelledError:  # the client left (server/disconnect.py): its queued rows are skipped
            self._count_failure(items, "cancelled")
            raise
        except Exception:  # a bug, not the caller's fault: this request fails alone, in the one error shape
            log.exception("predict failed")
            self._count_failure(items, "error")
            raise ApiError(
                500, "internal_error", "the server failed on this request; it has been logged"
            ) from None
        finally:
            self.active -= 1

    def _count_failure(self, items: list[PredictItem], outcome: str) -> None:
        # Label values stay bounded: a name the caller made up is counted as "unknown".
        for it in items or [None]:
            self.metrics.requests.labels(self.registry.label(it.adapter if it else None), outcome).inc()

    async def _predict(self, items: list[PredictItem]) -> list[PredictResponse]:
        if not self.accepting:
            raise ApiError(
                503,
                "unavailable",
                "server is not accepting requests (starting or draining)",
                {"Retry-After": "5"},
            )
        if not items:
            raise ApiError(422, "invalid_request", "no items")
        if len(items) > self.s.max_items:
            raise ApiError(
                413, "too_many_items", f"{len(items)} items; at most {self.s.max_items} per request"
            )
        plans = [self._validate(it) for it in items]  # all validated before anything is queued
        t0 = time.perf_counter()
        reqs = [
            ScoreRequest(p.adapter, it.question, tuple(it.choices), it.context, p.samples, p.seed)
            for it, p in zip(items, plans, strict=True)
        ]
        rows = sum(r.rows for r in reqs)
        # all items of a request, or none; only what can finish before the deadline (413: never; 429: not now)
        self.admit(rows, ADMISSION_MARGIN * self.s.request_timeout_s)
        self.registry.busy.update(p.adapter for p in plans)
        try:
            hits: list[list[bool]] = [[] for _ in items]  # per item: cache hit of each submit
            tasks = [
                self._score(it, r, p.record, h) for it, r, p, h in zip(items, reqs, plans, hits, strict=True)
            ]
            logits = await asyncio.wait_for(asyncio.gather(*tasks), self.s.request_timeout_s)
        except TimeoutError:
            raise ApiError(504, "timeout", f"not answered within {self.s.request_timeout_s} s") from None
        except BackendError as exc:
            raise ApiError(422, "unscorable", str(exc)) from None
        except BatchFailed as exc:  # the backend failed on a whole batch: only its requests fail, and say why
            log.error("%s", exc)
            raise ApiError(500, "backend_failed", str(exc)) from None
        finally:
            self.scheduler.release(rows)
            self.registry.busy.subtract(p.adapter for p in plans)
        wait = time.perf_counter() - t0
        return [
            self._respond(it, r, p.record, lg, t0, wait, cached=all(h))
            for it, r, p, lg, h in zip(items, reqs, plans, logits, hits, strict=True)
        ]

    async def _score(
        self, item: PredictItem, req: ScoreRequest, rec: AdapterRecord, hits: list[bool]
    ) -> Scored:
        """All S draws in one go, or (adaptive) rounds of draws until sampling_settled() says more cannot
        change the outcome. Admission reserved all S rows up front: an accepted request is never refused
        half-way."""
        adaptive = item.adaptive if item.adaptive is not None else self.s.adaptive
        cacheable = not item.fresh
        if not adaptive or req.samples <= self.s.adaptive_first:
            return await self._submit(req, cacheable, hits, rec.load_generation)
        policy = rec.policy_for(item.min_confidence, item.max_epistemic)
        temperature = rec.temperature
        parts, mass, n = [], [], 0
        for size in adaptive_rounds(req.samples, self.s.adaptive_first, self.s.adaptive_step):
            got = await self._submit(
                replace(req, samples=size, first=n), cacheable, hits, rec.load_generation
            )
            lg, m = got.logits, got.choice_mass
            parts.append(lg)
            if m is not None:
                mass.append((m, len(lg)))
            n += size
            if len(lg) < size:  # the adapter has no more distinct draws (deterministic, ensemble)
                break
            if sampling_settled(
                np.concatenate(parts) / temperature,
                policy.min_confidence,
                policy.max_epistemic,
                self.s.adaptive_tolerance,
                self.s.adaptive_z,
            ):
                break
        logits = np.concatenate(parts)
        return Scored(logits, sum(m * k for m, k in mass) / max(1, sum(k for _, k in mass)) if mass else None)

    async def _submit(self, req: ScoreRequest, cacheable: bool, hits: list[bool], load: int) -> Scored:
        """The scheduler, behind a cache of seeded results: the same question, seed and draws give the same
        logits. `load`: the adapter's load generation (a reload never serves an older load's results)."""
        size = self.s.result_cache_size
        key = (req.adapter, load, req)
        if cacheable and size and key in self.cache:
            self.cache.move_to_end(key)
            self.metrics.cache_hits.labels(req.adapter).inc()
            hits.append(True)
            return self.cache[key]
        hits.append(False)
        got = await self.scheduler.submit(req, admitted=True)  # _predict reserved all its rows
        if cacheable and size:
            self.cache[key] = got
            while len(self.cache) > size:
                self.cache.popitem(last=False)
        return got

    def _respond(
        self,
        item: PredictItem,
        req: ScoreRequest,
        rec: AdapterRecord,
        scored: Scored,
        t0: float,
        wait: float,
        cached: bool = False,
    ) -> PredictResponse:
        mass = scored.choice_mass
        logits = scored.logits / rec.temperature  # the cache keeps raw logits
        if not np.isfinite(logits).all():  # never answer with null probabilities
            raise ApiError(
                500,
                "non_finite_scores",
                f"adapter {req.adapter!r} produced non-finite scores for this "
                "request; the adapter is likely broken: reload or retrain it",
            )
        s = summarize(logits[:, None, :])  # (S, 1, K)
        one = {k: v[0] for k, v in s.items()}
        policy = rec.policy_for(item.min_confidence, item.max_epistemic)
        k = int(one["answer_index"])
        conf, epi_n, ent_n = (
            float(one["confidence"]),
            float(one["epistemic_norm"]),
            float(one["entropy_norm"]),
        )
        # Unfamiliarity: the conformal p-value of (MI, entropy) against the calibration split (adapters/shift.py);
        # the whole policy decides with it. The shift monitor sees every scored request (a cached repeat is not
        # new traffic, so it is not counted twice).
        u = policy.unfamiliarity(epi_n, ent_n)
        # A raised shift alarm (DALORRA_SHIFT_ACTION=strict): the whole traffic has shifted, so every request must
        # pass the stricter rule an unfamiliar one must (abstain reason `shift_alarm`).
        alarm = self.s.shift_action == "strict" and rec.monitor is not None and rec.monitor.alarm
        reason = policy.decide(conf, epi_n, u, shift_alarm=alarm)
        rid = item.id or uuid.uuid4().hex
        latency = time.perf_counter() - t0
        m = self.metrics
        m.requests.labels(req.adapter, "ok").inc()
        m.latency.labels(req.adapter).observe(latency)
        m.queue_wait.observe(wait)
        m.samples.labels(req.adapter).inc(len(logits))
        m.confidence.labels(req.adapter).observe(conf)
        m.entropy.labels(req.adapter).observe(float(one["entropy_norm"]))
        m.epistemic.labels(req.adapter).observe(float(one["epistemic_norm"]))
        if reason:
            m.abstentions.labels(req.adapter, reason).inc()
        if u is not None and not cached:
            state = rec.monitor.observe(epi_n, ent_n, conf, u) if rec.monitor is not None else None
            m.observe_shift(req.adapter, u, rec.unfamiliar_level, state)
        receipt = self.receipts.sign(
            {
                "id": uuid.uuid4().hex,
                "a": req.adapter,
                "p": k,
                "c": conf,
                "k": len(req.choices),
                "t": time.time(),
            }
        )
        sample_probs = None
        if item.return_samples:
            sample_probs = softmax(logits).round(6).tolist()
        return PredictResponse(
            id=rid,
            adapter=req.adapter,
            answer=req.choices[k],
            answer_index=k,
            probabilities=[float(x) for x in one["probabilities"]],
            confidence=conf,
            entropy=float(one["entropy"]),
            entropy_norm=float(one["entropy_norm"]),
            aleatoric=float(one["aleatoric"]),
            aleatoric_norm=float(one["aleatoric_norm"]),
            epistemic=float(one["epistemic"]),
            epistemic_norm=float(one["epistemic_norm"]),
            decision="abstain" if reason else "answer",
            abstain_reason=reason,
            unfamiliarity=u,
            prediction_set=policy.prediction_set(one["probabilities"]),
            samples=len(logits),
            choice_mass=mass,
            sample_probabilities=sample_probs,
            cached=cached,
            latency_ms=latency * 1000,
            receipt=receipt,
        )

    # ---- feedback -------------------------------------------------------------------------------
    def feedback(self, fb: FeedbackRequest) -> FeedbackResponse:
        try:
            p = self.receipts.verify(fb.receipt)  # signature first, then a typed payload (receipts.Payload)
        except (ReceiptError, ReceiptInvalid) as exc:
            self.metrics.feedback.labels("rejected").inc()
            raise ApiError(422 if isinstance(exc, ReceiptInvalid) else 403, "bad_receipt", str(exc)) from None
        if p.a not in self.registry:  # no metric series for names this replica does not serve
            self.metrics.feedback.labels("rejected").inc()
            raise ApiError(
                404,
                "adapter_not_loaded",
                f"the receipt is for adapter {p.a!r}, which this server "
                "has not loaded; send the feedback where it is loaded",
            )
        if fb.label >= p.k:
            self.metrics.feedback.labels("invalid").inc()
            raise ApiError(422, "invalid_label", f"label {fb.label} is not an index into {p.k} choices")
        correct = fb.label == p.p
        if not self.receipts.first_time(p.id):
            self.metrics.feedback.labels("duplicate").inc()
            return FeedbackResponse(accepted=True, duplicate=True, correct=correct)
        self.metrics.feedback.labels("accepted").inc()
        self.metrics.observe_feedback(p.a, p.c, correct)
        return FeedbackResponse(accepted=True, duplicate=False, correct=correct)


def feedback_key(configured: str | None) -> str:
    """The receipt key: the configured one, or, when none is set or it is a published example, a random key
    for this process (feedback then works only on this replica and until it restarts, and says so)."""
    if configured and configured not in PUBLIC_KEYS:
        return configured
    log.warning(
        "DALORRA_FEEDBACK_KEY is %s: receipts are signed with a random key of this process, so "
        "feedback is accepted only by this replica until it restarts. Set DALORRA_FEEDBACK_KEY to a "
        "secret shared by all replicas.",
        "a published example" if configured else "not set",
    )
    return secrets.token_urlsafe(32)
