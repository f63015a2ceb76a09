"""Serving logic, apart from the FastAPI glue: validate → batch → reduce → decide → sign → count."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import unicodedata
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adapters.decision import FIXED_SEED, DecisionPolicy, adaptive_rounds
from adapters.uncertainty import sampling_settled, softmax, summarize

from .backend import Backend, BackendError, Scored, ScoreRequest
from .batcher import Batcher, Overloaded, ShuttingDown
from .errors import ApiError
from .metrics import Metrics
from .protocol import AdapterInfo, FeedbackRequest, FeedbackResponse, PredictItem, PredictResponse
from .receipts import ReceiptError, ReceiptInvalid, Receipts

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("dalorra.service")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
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
    record: dict


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
    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics):
        self.s, self.backend, self.metrics = settings, backend, metrics
        self.receipts = Receipts(feedback_key(settings.feedback_key), settings.receipt_ttl_s)
        self.records: dict[str, dict] = {}  # loaded adapter name → its JSON record
        self.batcher: Batcher | None = None
        self.accepting = False
        self._load_lock = asyncio.Lock()
        # Results of seeded requests: (adapter, load generation, request fields) → logits. A reload bumps
        # the generation, so stale entries are never served; LRU-bounded by RESULT_CACHE_SIZE.
        self.cache: OrderedDict[tuple, np.ndarray | Scored] = OrderedDict()
        self.generation: dict[str, int] = {}
        self.active = 0  # /predict calls in progress (stop() waits for them)
        self.busy: Counter[str] = (
            Counter()
        )  # adapter → admitted items not yet answered (unload waits for them)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.batcher = Batcher(
            self.backend,
            self.s.max_batch_rows,
            self.s.max_wait_ms,
            self.s.max_queue_rows,
            on_batch=self.metrics.observe_batch,
            on_queue=self.metrics.queue_depth.set,
        )
        self.batcher.start()
        for name in [self.s.default_adapter, *self.s.preload]:
            if name and name not in self.records:
                await self.load(name)
        self.accepting = True
        self.metrics.ready.set_function(
            lambda: 1.0 if self.ready() else 0.0
        )  # exactly what /health/ready says

    def ready(self) -> bool:
        return self.accepting and bool(self.records) and self.backend.ready()

    async def stop(self, drain_s: float = 30.0) -> None:
        self.accepting = False
        if self.batcher:
            # Accepted requests finish first: an adaptive request is between rounds (neither queued nor in
            # flight) for a moment, so the batcher's own counters alone could look idle too early.
            end = time.perf_counter() + drain_s
            while self.active > 0 and time.perf_counter() < end:
                await asyncio.sleep(0.05)
            await self.batcher.drain(max(0.0, end - time.perf_counter()))
            await self.batcher.close()
        self.backend.shutdown()

    # ---- adapters -------------------------------------------------------------------------------
    def adapter_path(self, name: str) -> Path:
        """Adapters load only by name, from inside the configured directory (no traversal, no symlink escape)."""
        if not NAME.match(name):
            raise ApiError(422, "invalid_adapter_name", f"adapter name {name!r} must match {NAME.pattern}")
        root = Path(self.s.adapters_dir).resolve()
        path = (root / name).resolve()
        if root not in path.parents:
            raise ApiError(403, "forbidden", f"adapter {name!r} resolves outside the adapters directory")
        if not (path / "adapter_config.json").is_file():
            raise ApiError(404, "adapter_not_found", f"no adapter named {name!r} in the adapters directory")
        for f in path.iterdir():  # its files too: a folder of symlinks must not serve files from elsewhere
            if root not in f.resolve().parents:
                raise ApiError(
                    403, "forbidden", f"adapter {name!r}: {f.name} resolves outside the adapters directory"
                )
        return path

    async def load(self, name: str) -> dict:
        path = self.adapter_path(name)
        async with self._load_lock:
            try:  # off the event loop: requests on other adapters keep flowing
                rec = await asyncio.get_running_loop().run_in_executor(
                    None, self.backend.load_adapter, name, str(path)
                )
            except Exception as exc:
                log.warning("adapter %s (%s) could not be loaded: %s", name, path, exc)
                # The client sees the adapter's name, never where the server keeps it.
                msg = str(exc).replace(str(path), name).replace(str(path.parent), "<adapters_dir>")
                raise ApiError(422, "bad_adapter", f"adapter {name!r} could not be loaded: {msg}") from None
            self.records[name] = rec
            self.generation[name] = self.generation.get(name, 0) + 1
            self.metrics.adapters_loaded.set(len(self.records))
            self.metrics.init_adapter(name)
        log.info("loaded adapter %s from %s", name, path)
        return rec

    async def unload(self, name: str) -> None:
        """New requests for `name` are refused at once (404 adapter_not_loaded); requests already admitted
        finish on it (up to the request deadline); then the backend frees it, off the event loop (it waits for
        the running batch)."""
        async with self._load_lock:
            if name not in self.records:
                raise ApiError(404, "adapter_not_found", f"adapter {name!r} is not loaded")
            self.records.pop(name)
            self.metrics.adapters_loaded.set(len(self.records))
            end = time.perf_counter() + self.s.request_timeout_s
            while self.busy[name] > 0 and time.perf_counter() < end:
                await asyncio.sleep(0.02)
            await asyncio.get_running_loop().run_in_executor(None, self.backend.unload_adapter, name)
        log.info("unloaded adapter %s", name)

    def describe(self, name: str) -> AdapterInfo:
        rec = self.records.get(name)
        if rec is None:
            return AdapterInfo(name=name, loaded=False)
        a = rec.get("adapter", {})
        return AdapterInfo(
            name=name,
            loaded=True,
            method=rec.get("method"),
            base_model=rec.get("base_model", {}).get("name"),
            rank=a.get("r"),
            p0=a.get("p0"),
            mode=rec.get("prompt", {}).get("mode"),
            keep_probability=rec.get("keep_probability", {}),
            temperature=self.temperature(name),
            default_samples=rec.get("default_samples", self.s.default_samples),
            calibration=(rec.get("calibration") or {}).get("metrics"),
            decision=rec.get("decision"),
            validation=rec.get("validation"),
        )

    def available(self) -> list[str]:
        root = Path(self.s.adapters_dir)
        on_disk = (
            sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
            if root.is_dir()
            else []
        )
        return sorted(set(on_disk) | set(self.records))

    # ---- predict --------------------------------------------------------------------------------
    def _validate(self, item: PredictItem) -> Plan:
        s = self.s
        name = item.adapter or s.default_adapter
        rec = self.records.get(name)
        if rec is None:
            if NAME.match(name or "") and (Path(s.adapters_dir) / name).is_dir():
                raise ApiError(
                    404,
                    "adapter_not_loaded",
                    f"adapter {name!r} exists but is not loaded; POST /v1/adapters/{name}/load",
                )
            raise ApiError(404, "adapter_not_found", f"unknown adapter {name!r}; see GET /v1/adapters")
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
        samples = item.samples or rec.get("default_samples") or s.default_samples
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
            name = (it.adapter if it else None) or self.s.default_adapter
            self.metrics.requests.labels(name if name in self.records else "unknown", outcome).inc()

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
        if rows > self.s.max_queue_rows:
            raise ApiError(
                413,
                "too_large",
                f"request needs {rows} rows (items × samples); this server queues "
                f"at most {self.s.max_queue_rows}: split it or lower samples",
            )
        try:  # all items of a request, or none; only what can finish before the deadline
            self.batcher.admit(rows, ADMISSION_MARGIN * self.s.request_timeout_s)
        except Overloaded as exc:
            raise ApiError(
                429, "overloaded", str(exc), {"Retry-After": str(int(np.ceil(exc.retry_after)))}
            ) from None
        except ShuttingDown:
            raise ApiError(503, "unavailable", "server is shutting down", {"Retry-After": "5"}) from None
        self.busy.update(p.adapter for p in plans)
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
        finally:
            self.batcher.release(rows)
            self.busy.subtract(p.adapter for p in plans)
        wait = time.perf_counter() - t0
        return [
            self._respond(it, r, p.record, lg, t0, wait, cached=all(h))
            for it, r, p, lg, h in zip(items, reqs, plans, logits, hits, strict=True)
        ]

    async def _score(
        self, item: PredictItem, req: ScoreRequest, rec: dict, hits: list[bool]
    ) -> np.ndarray | Scored:
        """All S draws in one go, or (adaptive) rounds of draws until sampling_settled() says more cannot
        change the outcome. Admission reserved all S rows up front: an accepted request is never refused
        half-way."""
        adaptive = item.adaptive if item.adaptive is not None else self.s.adaptive
        cacheable = not item.fresh
        if not adaptive or req.samples <= self.s.adaptive_first:
            return await self._submit(req, cacheable, hits)
        policy = self._policy(item, rec)
        temperature = _temperature(rec)
        parts, mass, n = [], [], 0
        for size in adaptive_rounds(req.samples, self.s.adaptive_first, self.s.adaptive_step):
            got = await self._submit(replace(req, samples=size, first=n), cacheable, hits)
            lg, m = (got.logits, got.choice_mass) if isinstance(got, Scored) else (got, None)
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
        if mass:
            return Scored(logits, sum(m * k for m, k in mass) / max(1, sum(k for _, k in mass)))
        return logits

    async def _submit(self, req: ScoreRequest, cacheable: bool, hits: list[bool]) -> np.ndarray | Scored:
        """The batcher, behind a cache of seeded results: the same question, seed and draws give the same logits."""
        size = self.s.result_cache_size
        key = (req.adapter, self.generation.get(req.adapter, 0), req)
        if cacheable and size and key in self.cache:
            self.cache.move_to_end(key)
            self.metrics.cache_hits.labels(req.adapter).inc()
            hits.append(True)
            return self.cache[key]
        hits.append(False)
        got = await self.batcher.submit(req, admitted=True)  # _predict reserved all its rows
        if cacheable and size:
            self.cache[key] = got
            while len(self.cache) > size:
                self.cache.popitem(last=False)
        return got

    def temperature(self, adapter: str) -> float:
        """The adapter's fitted temperature (1: none): every mask's choice logits are divided by it before
        averaging, so probabilities, entropy and MI are those of the calibrated per-mask distributions."""
        return _temperature(self.records.get(adapter, {}))

    @staticmethod
    def _policy(item: PredictItem, rec: dict) -> DecisionPolicy:
        """The policy in force: the request's threshold overrides, else the adapter's valid fitted ones."""
        return DecisionPolicy.from_record(rec.get("decision"), item.min_confidence, item.max_epistemic)

    def _respond(
        self,
        item: PredictItem,
        req: ScoreRequest,
        rec: dict,
        logits: np.ndarray | Scored,
        t0: float,
        wait: float,
        cached: bool = False,
    ) -> PredictResponse:
        mass = None
        if isinstance(logits, Scored):
            logits, mass = logits.logits, logits.choice_mass
        logits = logits / _temperature(rec)  # the cache keeps raw logits
        if not np.isfinite(logits).all():  # never answer with null probabilities
            raise ApiError(
                500,
                "non_finite_scores",
                f"adapter {req.adapter!r} produced non-finite scores for this "
                "request; the adapter is likely broken: reload or retrain it",
            )
        s = summarize(logits[:, None, :])  # (S, 1, K)
        one = {k: v[0] for k, v in s.items()}
        policy = self._policy(item, rec)
        reason = policy.reason(float(one["confidence"]), float(one["epistemic_norm"]))
        k = int(one["answer_index"])
        conf = float(one["confidence"])
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
        if p.a not in self.records:  # no metric series for names this replica does not serve
            self.metrics.feedback.labels("rejected").inc()
            raise ApiError(
                404,
                "adapter_not_loaded",
                f"the receipt is for adapter {p.a!r}, which this server "
                "has not loaded; send the feedback where it is loaded",
            )
        if fb.label >= p.k:
            raise ApiError(422, "invalid_label", f"label {fb.label} is not an index into {p.k} choices")
        correct = fb.label == p.p
        if not self.receipts.first_time(p.id):
            self.metrics.feedback.labels("duplicate").inc()
            return FeedbackResponse(accepted=True, duplicate=True, correct=correct)
        self.metrics.feedback.labels("accepted").inc()
        self.metrics.observe_feedback(p.a, p.c, correct)
        return FeedbackResponse(accepted=True, duplicate=False, correct=correct)


def _temperature(rec: dict) -> float:
    t = rec.get("temperature", 1.0)
    return float(t) if isinstance(t, int | float) and t > 0 else 1.0


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
