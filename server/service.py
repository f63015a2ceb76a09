"""Serving logic, apart from the FastAPI glue: validate → batch → reduce → decide → sign → count."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np

from adapters.calibration import prediction_set
from adapters.uncertainty import sampling_settled, softmax, summarize

from .backend import Backend, BackendError, Scored, ScoreRequest
from .batcher import Batcher, Overloaded, ShuttingDown
from .errors import ApiError
from .metrics import Metrics
from .protocol import AdapterInfo, FeedbackRequest, FeedbackResponse, PredictItem, PredictResponse
from .receipts import ReceiptError, Receipts

log = logging.getLogger("dalorra.service")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FIXED_SEED = 0  # the adapter's fixed mask draws: same question, same masks, same answer


class Service:
    def __init__(self, settings, backend: Backend, metrics: Metrics):
        self.s, self.backend, self.metrics = settings, backend, metrics
        self.receipts = Receipts(settings.feedback_key, settings.receipt_ttl_s)
        self.records: dict[str, dict] = {}  # loaded adapter name → its JSON record
        self.batcher: Batcher | None = None
        self.accepting = False
        self._load_lock = asyncio.Lock()
        # Results of seeded requests: (adapter, load generation, request fields) → logits. A reload bumps
        # the generation, so stale entries are never served; LRU-bounded by RESULT_CACHE_SIZE.
        self.cache: OrderedDict[tuple, object] = OrderedDict()
        self.generation: dict[str, int] = {}
        self.active = 0  # /predict calls in progress (stop() waits for them)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.batcher = Batcher(self.backend, self.s.max_batch_rows, self.s.max_wait_ms, self.s.max_queue_rows,
                               on_batch=self.metrics.observe_batch, on_queue=self.metrics.queue_depth.set)
        self.batcher.start()
        for name in [self.s.default_adapter, *self.s.preload]:
            if name and name not in self.records:
                await self.load(name)
        self.accepting = True
        self.metrics.ready.set(1)

    def ready(self) -> bool:
        return self.accepting and bool(self.records) and self.backend.ready()

    async def stop(self, drain_s: float = 30.0) -> None:
        self.accepting = False
        self.metrics.ready.set(0)
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
        return path

    async def load(self, name: str) -> dict:
        path = self.adapter_path(name)
        async with self._load_lock:
            try:  # off the event loop: requests on other adapters keep flowing
                rec = await asyncio.get_running_loop().run_in_executor(None, self.backend.load_adapter, name,
                                                                       str(path))
            except Exception as exc:
                raise ApiError(422, "bad_adapter", f"adapter {name!r} could not be loaded: {exc}") from None
            self.records[name] = rec
            self.generation[name] = self.generation.get(name, 0) + 1
            self.metrics.adapters_loaded.set(len(self.records))
            self.metrics.init_adapter(name)
        log.info("loaded adapter %s from %s", name, path)
        return rec

    async def unload(self, name: str) -> None:
        if name not in self.records:
            raise ApiError(404, "adapter_not_found", f"adapter {name!r} is not loaded")
        async with self._load_lock:
            self.records.pop(name)
            self.backend.unload_adapter(name)
            self.metrics.adapters_loaded.set(len(self.records))

    def describe(self, name: str) -> AdapterInfo:
        rec = self.records.get(name)
        if rec is None:
            return AdapterInfo(name=name, loaded=False)
        a = rec.get("adapter", {})
        return AdapterInfo(name=name, loaded=True, method=rec.get("method"),
                           base_model=rec.get("base_model", {}).get("name"), rank=a.get("r"), p0=a.get("p0"),
                           mode=rec.get("prompt", {}).get("mode"),
                           keep_probability=rec.get("keep_probability", {}),
                           temperature=self.temperature(name),
                           default_samples=rec.get("default_samples", self.s.default_samples),
                           calibration=(rec.get("calibration") or {}).get("metrics"),
                           decision=rec.get("decision"), validation=rec.get("validation"))

    def available(self) -> list[str]:
        root = Path(self.s.adapters_dir)
        on_disk = sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file()) \
            if root.is_dir() else []
        return sorted(set(on_disk) | set(self.records))

    # ---- predict --------------------------------------------------------------------------------
    def _validate(self, item: PredictItem) -> tuple[str, int, int]:
        s = self.s
        name = item.adapter or s.default_adapter
        if name not in self.records:
            if NAME.match(name or "") and (Path(s.adapters_dir) / name).is_dir():
                raise ApiError(404, "adapter_not_loaded", f"adapter {name!r} exists but is not loaded; "
                                                          f"POST /v1/adapters/{name}/load")
            raise ApiError(404, "adapter_not_found", f"unknown adapter {name!r}; see GET /v1/adapters")
        if not item.question.strip():
            raise ApiError(422, "invalid_request", "question is empty")
        if len(item.question) + len(item.context or "") > s.max_question_chars:
            raise ApiError(413, "too_long", f"question + context exceed {s.max_question_chars} characters")
        for i, c in enumerate(item.choices):
            if not c.strip():
                raise ApiError(422, "invalid_request", f"choice {i} is empty")
            if len(c) > s.max_choice_chars:
                raise ApiError(413, "too_long", f"choice {i} exceeds {s.max_choice_chars} characters")
        samples = item.samples or self.records[name].get("default_samples") or s.default_samples
        if samples > s.max_samples:
            raise ApiError(422, "invalid_request", f"samples={samples} exceeds the limit {s.max_samples}")
        if item.fresh and item.seed is not None:
            raise ApiError(422, "invalid_request", "give either seed or fresh=true, not both")
        seed = item.seed if item.seed is not None else (
            int.from_bytes(uuid.uuid4().bytes[:4], "big") if item.fresh else FIXED_SEED)
        return name, samples, seed

    async def predict(self, items: list[PredictItem]) -> list[PredictResponse]:
        self.active += 1
        try:
            return await self._predict(items)
        finally:
            self.active -= 1

    async def _predict(self, items: list[PredictItem]) -> list[PredictResponse]:
        if not self.accepting:
            raise ApiError(503, "unavailable", "server is not accepting requests (starting or draining)",
                           {"Retry-After": "5"})
        if not items:
            raise ApiError(422, "invalid_request", "no items")
        if len(items) > self.s.max_items:
            raise ApiError(413, "too_many_items", f"{len(items)} items; at most {self.s.max_items} per request")
        plans = [self._validate(it) for it in items]  # all validated before anything is queued
        t0 = time.perf_counter()
        reqs = [ScoreRequest(name, it.question, tuple(it.choices), it.context, samples, seed)
                for it, (name, samples, seed) in zip(items, plans, strict=True)]
        rows = sum(r.rows for r in reqs)
        if rows > self.s.max_queue_rows:
            raise ApiError(413, "too_large", f"request needs {rows} rows (items × samples); this server queues "
                                             f"at most {self.s.max_queue_rows}: split it or lower samples")
        try:
            self.batcher.admit(rows)  # all items of a request, or none
            tasks = [self._score(it, r) for it, r in zip(items, reqs, strict=True)]
            logits = await asyncio.wait_for(asyncio.gather(*tasks), self.s.request_timeout_s)
        except Overloaded as exc:
            for r in reqs:
                self.metrics.requests.labels(r.adapter, "rejected").inc()
            raise ApiError(429, "overloaded", str(exc), {"Retry-After": str(int(np.ceil(exc.retry_after)))}) from None
        except ShuttingDown:
            raise ApiError(503, "unavailable", "server is shutting down", {"Retry-After": "5"}) from None
        except TimeoutError:
            for r in reqs:
                self.metrics.requests.labels(r.adapter, "timeout").inc()
            raise ApiError(504, "timeout", f"not answered within {self.s.request_timeout_s} s") from None
        except BackendError as exc:
            raise ApiError(422, "unscorable", str(exc)) from None
        wait = time.perf_counter() - t0
        return [self._respond(it, r, lg, t0, wait) for it, r, lg in zip(items, reqs, logits, strict=True)]

    async def _score(self, item: PredictItem, req: ScoreRequest):
        """All S draws in one go, or (adaptive) rounds of draws until sampling_settled() says more cannot
        change the outcome. Later rounds skip admission: an accepted request is never refused half-way."""
        adaptive = item.adaptive if item.adaptive is not None else self.s.adaptive
        cacheable = not item.fresh
        if not adaptive or req.samples <= self.s.adaptive_first:
            return await self._submit(req, cacheable)
        conf_t, epi_t = self._thresholds(item, req.adapter)
        parts, mass, n = [], [], 0
        while n < req.samples:
            size = self.s.adaptive_first if n == 0 else min(self.s.adaptive_step, req.samples - n)
            got = await self._submit(replace(req, samples=size, first=n), cacheable, admitted=n > 0)
            lg, m = (got.logits, got.choice_mass) if isinstance(got, Scored) else (got, None)
            parts.append(lg)
            if m is not None:
                mass.append((m, len(lg)))
            n += size
            if len(lg) < size:  # the adapter has no more distinct draws (deterministic, ensemble)
                break
            if sampling_settled(np.concatenate(parts) / self.temperature(req.adapter), conf_t, epi_t,
                                self.s.adaptive_tolerance, self.s.adaptive_z):
                break
        logits = np.concatenate(parts)
        if mass:
            return Scored(logits, sum(m * k for m, k in mass) / max(1, sum(k for _, k in mass)))
        return logits

    async def _submit(self, req: ScoreRequest, cacheable: bool, admitted: bool = False):
        """The batcher, behind a cache of seeded results: the same question, seed and draws give the same logits."""
        size = self.s.result_cache_size
        key = (req.adapter, self.generation.get(req.adapter, 0), req)
        if cacheable and size and key in self.cache:
            self.cache.move_to_end(key)
            self.metrics.cache_hits.labels(req.adapter).inc()
            return self.cache[key]
        got = await self.batcher.submit(req, admitted=admitted)
        if cacheable and size:
            self.cache[key] = got
            while len(self.cache) > size:
                self.cache.popitem(last=False)
        return got

    def temperature(self, adapter: str) -> float:
        """The adapter's fitted temperature (1: none): every mask's choice logits are divided by it before
        averaging, so probabilities, entropy and MI are those of the calibrated per-mask distributions."""
        t = self.records.get(adapter, {}).get("temperature", 1.0)
        return float(t) if isinstance(t, int | float) and t > 0 else 1.0

    def _thresholds(self, item: PredictItem, adapter: str) -> tuple[float | None, float | None]:
        """The abstention thresholds in force: the request's overrides, else the adapter's valid fitted ones."""
        decision = self.records.get(adapter, {}).get("decision") or {}
        conf_t = item.min_confidence if item.min_confidence is not None else (
            decision.get("confidence", {}).get("threshold") if decision.get("confidence", {}).get("valid") else None)
        epi_t = item.max_epistemic if item.max_epistemic is not None else (
            decision.get("epistemic", {}).get("threshold") if decision.get("epistemic", {}).get("valid") else None)
        return conf_t, epi_t

    def _respond(self, item: PredictItem, req: ScoreRequest, logits: np.ndarray | Scored, t0: float,
                 wait: float) -> PredictResponse:
        mass = None
        if isinstance(logits, Scored):
            logits, mass = logits.logits, logits.choice_mass
        logits = logits / self.temperature(req.adapter)  # the cache keeps raw logits
        s = summarize(logits[:, None, :])  # (S, 1, K)
        one = {k: v[0] for k, v in s.items()}
        decision = self.records.get(req.adapter, {}).get("decision") or {}
        conf_t, epi_t = self._thresholds(item, req.adapter)
        reason = None
        if conf_t is not None and one["confidence"] < conf_t:
            reason = "low_confidence"
        elif epi_t is not None and one["epistemic_norm"] > epi_t:
            reason = "high_epistemic"
        qhat = (decision.get("conformal") or {}).get("qhat")
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
        receipt = self.receipts.sign({"id": uuid.uuid4().hex, "a": req.adapter, "p": k, "c": conf,
                                      "k": len(req.choices), "t": time.time()})
        sample_probs = None
        if item.return_samples:
            sample_probs = softmax(logits).round(6).tolist()
        return PredictResponse(
            id=rid, adapter=req.adapter, answer=req.choices[k], answer_index=k,
            probabilities=[float(x) for x in one["probabilities"]], confidence=conf,
            entropy=float(one["entropy"]), entropy_norm=float(one["entropy_norm"]),
            aleatoric=float(one["aleatoric"]), aleatoric_norm=float(one["aleatoric_norm"]),
            epistemic=float(one["epistemic"]), epistemic_norm=float(one["epistemic_norm"]),
            decision="abstain" if reason else "answer", abstain_reason=reason,
            prediction_set=prediction_set(one["probabilities"], qhat), samples=len(logits), choice_mass=mass,
            sample_probabilities=sample_probs, latency_ms=latency * 1000, receipt=receipt)

    # ---- feedback -------------------------------------------------------------------------------
    def feedback(self, fb: FeedbackRequest) -> FeedbackResponse:
        try:
            p = self.receipts.verify(fb.receipt)
        except (ReceiptError, KeyError, ValueError) as exc:
            self.metrics.feedback.labels("rejected").inc()
            raise ApiError(403 if isinstance(exc, ReceiptError) else 422, "bad_receipt", str(exc)) from None
        if fb.label >= p["k"]:
            raise ApiError(422, "invalid_label", f"label {fb.label} is not an index into {p['k']} choices")
        correct = fb.label == p["p"]
        if not self.receipts.first_time(p["id"]):
            self.metrics.feedback.labels("duplicate").inc()
            return FeedbackResponse(accepted=True, duplicate=True, correct=correct)
        self.metrics.feedback.labels("accepted").inc()
        self.metrics.observe_feedback(p["a"], p["c"], correct)
        return FeedbackResponse(accepted=True, duplicate=False, correct=correct)
