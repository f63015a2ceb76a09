"""The adapter registry: the one owner of the loaded adapters (STYLE 15-16).

An adapter is read once, when it loads, into an `AdapterRecord` (a typed, frozen record: method, rank, keep-
probabilities, temperature, decision policy, prompt mode, generation thresholds, …). Routes, services and the
scheduler ask the registry for a record by name and get it, or the one 404/503 that says why not; nobody re-reads
a record dict. Loading and unloading go through the registry, which tells the backend to attach or detach the
adapter's factors on the shared base (no base reload).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.decision import DEFAULT_UNFAMILIAR_ALPHA, AbstentionPolicy
from adapters.generation import generation_policy
from adapters.shift import MonitorConfig, ShiftMonitor

from .errors import ApiError
from .protocol import AdapterInfo

if TYPE_CHECKING:
    from .backend import Backend
    from .metrics import Metrics
    from .settings import Settings

log = logging.getLogger("dalorra.registry")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class GenerationThresholds:
    """The fitted policy for generated answers, and where it came from."""

    policy: AbstentionPolicy = field(default_factory=AbstentionPolicy)
    source: str = "none fitted"
    record: dict | None = None  # the fitted block as written (request overrides re-parse it with theirs)


@dataclass(frozen=True)
class AdapterRecord:
    """A loaded adapter as the server sees it, parsed and checked once at load."""

    name: str
    method: str
    base_model: str | None
    rank: int | None
    p0: float | None
    mode: str | None  # prompt mode: cloze | letter
    keep_probability: dict[str, float]
    temperature: float  # divides every mask's choice logits before averaging (1: not fitted)
    default_samples: int | None
    decision: dict | None  # the fitted decision block, as shown by describe()
    policy: AbstentionPolicy  # the decision block parsed (no request overrides)
    generation: GenerationThresholds
    calibration: dict | None = None
    validation: dict | None = None
    load_generation: int = 0  # bumped by every (re)load: cached results of an older load are never served
    loaded_at: float = field(default_factory=time.time)
    unfamiliar_alpha: float | None = None  # DALORRA_UNFAMILIAR_ALPHA (None: the fitted rule's level)
    # The label-free shift monitor of this load (None: the record stores no calibration reference). A mutable
    # object held by the frozen record: its state changes, the record never does.
    monitor: ShiftMonitor | None = field(default=None, compare=False, repr=False)

    @property
    def unfamiliar_level(self) -> float:
        """α_u: a request with unfamiliarity below it counts as unfamiliar."""
        rule = self.policy.unfamiliar
        if self.unfamiliar_alpha is not None:
            return self.unfamiliar_alpha
        return rule.alpha if rule is not None else DEFAULT_UNFAMILIAR_ALPHA

    def policy_for(self, min_confidence: float | None, max_epistemic: float | None) -> AbstentionPolicy:
        """The policy in force for a request: its threshold overrides (uncertified), else the fitted one."""
        if min_confidence is None and max_epistemic is None:
            return self.policy
        return AbstentionPolicy.from_record(
            self.decision, min_confidence, max_epistemic, self.unfamiliar_alpha
        )

    def shift(self) -> dict | None:
        """The shift monitor's state, as /v1/adapters/{name} and the web page show it."""
        if self.monitor is None:
            return None
        st = self.monitor.state()
        return {
            "observed": st.observed,
            "statistic": min(st.statistic, 1e300),
            "threshold": st.threshold,
            "alarm": st.alarm,
            "alarm_at": st.alarm_at,
            "alarm_by": st.alarm_by,
            "components": {name: min(v, 1e300) for name, v in st.components},
            "periods": st.periods,
            "unfamiliar": st.unfamiliar,
            "unfamiliar_recent": st.unfamiliar_recent,
            "recent": st.recent,
            "unfamiliar_level": self.unfamiliar_level,
            "histogram": list(st.histogram),
            "accuracy_estimate": st.accuracy_estimate,
            "accuracy_estimate_method": st.accuracy_estimate_method,
            "false_alarm_level": self.monitor.config.alpha,
            "period": self.monitor.config.period,
        }

    def info(self) -> AdapterInfo:
        return AdapterInfo(
            name=self.name,
            loaded=True,
            method=self.method,
            base_model=self.base_model,
            rank=self.rank,
            p0=self.p0,
            mode=self.mode,
            keep_probability=self.keep_probability,
            temperature=self.temperature,
            default_samples=self.default_samples,
            calibration=self.calibration,
            decision=self.decision,
            validation=self.validation,
            certified=self.policy.certified,
            shift=self.shift(),
        )


class RecordError(ValueError):
    """An adapter record (or its generation thresholds) the server cannot serve from."""


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _temperature(raw: dict) -> float:
    t = raw.get("temperature", 1.0)
    if not _number(t) or t <= 0:
        raise RecordError(f"temperature {t!r} must be a positive number")
    return float(t)


def parse_generation(rec: object, source: str) -> GenerationThresholds:
    """A generation decision record (generation_decision.json): thresholds checked, or RecordError."""
    if rec is None:
        return GenerationThresholds()
    if not isinstance(rec, dict):
        raise RecordError(f"{source}: a generation decision must be a JSON object, not {type(rec).__name__}")
    for key in ("confidence", "epistemic"):
        block = rec.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise RecordError(f"{source}: {key!r} must be an object with 'threshold' and 'valid'")
        t = block.get("threshold")
        if block.get("valid") and not _number(t):
            raise RecordError(f"{source}: {key}.threshold {t!r} must be a finite number when valid")
    try:
        policy = generation_policy(rec)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise RecordError(f"{source}: the generation policy cannot be read ({exc})") from None
    for name in ("min_confidence", "max_epistemic"):
        t = getattr(policy, name)
        if t is not None and not _number(t):
            raise RecordError(f"{source}: {name} {t!r} must be a finite number")
    return GenerationThresholds(policy, source, rec)


def parse_record(
    name: str,
    raw: dict,
    generation: GenerationThresholds,
    load_generation: int,
    unfamiliar_alpha: float | None = None,
) -> AdapterRecord:
    """dalorra.json (as the backend returned it) → AdapterRecord; RecordError when it cannot be served."""
    if not isinstance(raw, dict):
        raise RecordError("the adapter record is not a JSON object")
    a = raw.get("adapter") or {}
    decision = raw.get("decision")
    if decision is not None and not isinstance(decision, dict):
        raise RecordError("decision must be an object")
    try:
        policy = AbstentionPolicy.from_record(decision, None, None, unfamiliar_alpha)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise RecordError(f"decision block cannot be read ({exc})") from None
    samples = raw.get("default_samples")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise RecordError(f"default_samples {samples!r} must be a positive integer")
    return AdapterRecord(
        name=name,
        method=str(raw.get("method") or a.get("method") or "lora"),
        base_model=(raw.get("base_model") or {}).get("name"),
        rank=a.get("r"),
        p0=a.get("p0"),
        mode=(raw.get("prompt") or {}).get("mode"),
        keep_probability=dict(raw.get("keep_probability") or {}),
        temperature=_temperature(raw),
        default_samples=samples,
        decision=decision,
        policy=policy,
        generation=generation,
        calibration=(raw.get("calibration") or {}).get("metrics"),
        validation=raw.get("validation"),
        load_generation=load_generation,
        unfamiliar_alpha=unfamiliar_alpha,
    )


class Registry:
    """Loaded adapters by name. Lookups answer the record or raise the ApiError a client should see."""

    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics):
        self.s, self.backend, self.metrics = settings, backend, metrics
        self._records: dict[str, AdapterRecord] = {}
        self._loads: Counter[str] = Counter()  # name → how many times it was loaded
        self._lock = asyncio.Lock()
        self.busy: Counter[str] = Counter()  # adapter → admitted work not yet answered (unload waits for it)

    # ---- lookups ----------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._records

    def names(self) -> list[str]:
        return list(self._records)

    def records(self) -> list[AdapterRecord]:
        return list(self._records.values())

    def get(self, name: str | None) -> AdapterRecord:
        """The loaded adapter `name` (None: the default), or 404 adapter_not_loaded / adapter_not_found."""
        name = name or self.s.default_adapter
        rec = self._records.get(name)
        if rec is not None:
            return rec
        if NAME.match(name or "") and (Path(self.s.adapters_dir) / name).is_dir():
            raise ApiError(
                404,
                "adapter_not_loaded",
                f"adapter {name!r} exists but is not loaded; POST /v1/adapters/{name}/load",
            )
        raise ApiError(404, "adapter_not_found", f"unknown adapter {name!r}; see GET /v1/adapters")

    def find(self, name: str | None) -> AdapterRecord | None:
        return self._records.get(name or self.s.default_adapter)

    def label(self, name: str | None) -> str:
        """A bounded metrics label: the adapter's name when it is loaded, else "unknown"."""
        name = name or self.s.default_adapter
        return name if name in self._records else "unknown"

    def describe(self, name: str) -> AdapterInfo:
        rec = self._records.get(name)
        return rec.info() if rec is not None else AdapterInfo(name=name, loaded=False)

    def available(self) -> list[str]:
        root = Path(self.s.adapters_dir)
        on_disk = (
            sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
            if root.is_dir()
            else []
        )
        return sorted(set(on_disk) | set(self._records))

    def path(self, name: str) -> Path:
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

    # ---- load / unload ----------------------------------------------------------------------------
    def _generation_thresholds(self, name: str, path: Path) -> GenerationThresholds:
        """DALORRA_GENERATION_DECISION[name], else <adapter dir>/generation_decision.json, else none."""
        if self.s.generation_decision is not None and Path(self.s.generation_decision).is_file():
            src = str(self.s.generation_decision)
            try:
                table = json.loads(Path(src).read_text())
            except (OSError, ValueError) as exc:
                raise RecordError(f"{src} is not valid JSON ({exc})") from None
            if not isinstance(table, dict):
                raise RecordError(f"{src} must be a JSON object {{adapter: decision}}")
            if table.get(name) is not None:
                return parse_generation(table[name], src)
        f = path / "generation_decision.json"
        if f.is_file():
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError) as exc:
                raise RecordError(f"generation_decision.json is not valid JSON ({exc})") from None
            return parse_generation(rec, "generation_decision.json")
        return GenerationThresholds()

    async def load(self, name: str) -> AdapterRecord:
        path = self.path(name)
        async with self._lock:
            loop = asyncio.get_running_loop()
            try:  # off the event loop: requests on other adapters keep flowing
                gen = await loop.run_in_executor(None, self._generation_thresholds, name, path)
                raw = await loop.run_in_executor(None, self.backend.load_adapter, name, str(path))
                try:
                    rec = parse_record(name, raw, gen, self._loads[name] + 1, self.s.unfamiliar_alpha)
                    rec = self._with_monitor(rec)
                except RecordError:
                    await loop.run_in_executor(None, self.backend.unload_adapter, name)
                    raise
            except Exception as exc:
                log.warning("adapter %s (%s) could not be loaded: %s", name, path, exc)
                # The client sees the adapter's name, never where the server keeps it.
                msg = str(exc).replace(str(path), name).replace(str(path.parent), "<adapters_dir>")
                raise ApiError(422, "bad_adapter", f"adapter {name!r} could not be loaded: {msg}") from None
            self._loads[name] += 1
            self._records[name] = rec
            self.metrics.adapters_loaded.set(len(self._records))
            self.metrics.init_adapter(name)
            if rec.monitor is not None:
                self.metrics.init_shift(name, rec.monitor.state())
        log.info("loaded adapter %s from %s", name, path)
        return rec

    def _with_monitor(self, rec: AdapterRecord) -> AdapterRecord:
        """A fresh shift monitor for this load, when the record holds the calibration reference to test against."""
        ref = rec.policy.reference
        if ref is None:
            return rec
        cfg = MonitorConfig(
            alpha=self.s.shift_alpha,
            period=self.s.shift_period,
            window=self.s.shift_window,
            unfamiliar_alpha=rec.unfamiliar_level,
        )
        return replace(rec, monitor=ShiftMonitor(ref, cfg))

    async def unload(self, name: str) -> None:
        """New requests for `name` are refused at once (404 adapter_not_loaded); work already admitted finishes on
        it (up to the request deadline); then the backend detaches it, off the event loop."""
        async with self._lock:
            if name not in self._records:
                raise ApiError(404, "adapter_not_found", f"adapter {name!r} is not loaded")
            self._records.pop(name)
            self.metrics.adapters_loaded.set(len(self._records))
            end = time.perf_counter() + self.s.request_timeout_s
            while self.busy[name] > 0 and time.perf_counter() < end:
                await asyncio.sleep(0.02)
            await asyncio.get_running_loop().run_in_executor(None, self.backend.unload_adapter, name)
        log.info("unloaded adapter %s", name)
