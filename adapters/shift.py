"""Inputs unlike the calibration split: a per-request conformal p-value and a streaming shift monitor.

Pure Python + NumPy (the server imports this without torch).

**Unfamiliarity.** Each request has two uncertainty scores, normalised epistemic (MI / log K) and normalised
entropy (H / log K) for choices, or mean token MI and entropy for generated answers. A shift of task can raise MI
while lowering entropy (the adapter is confidently wrong); a shift of domain raises entropy and lowers MI; so both
tails of both scores count: four oriented scores o_1..o_4 = (e, −e, h, −h). `Reference` holds the n (e, h) pairs
of the calibration items that fit the policy (the part disjoint from the temperature fit, scored at the fitted
temperature, so they are exchangeable with in-distribution requests). For a request x:

  rank_t(z)  = #{points w of the bag with o_t(w) ≥ o_t(z)}       bag = the n calibration items and x
  A(z)       = (smallest rank_t(z), second smallest), compared lexicographically: how far out z sits in its
               most extreme tail (ties broken by its next most extreme one)
  p(x)       = #{z in the bag: A(z) ≤ A(x)} / (n + 1)              (x counts itself: p ≥ 1/(n+1))

A(·) is a symmetric function of the bag, so under exchangeability A(x) is uniformly ranked among the n + 1 values
and P(p(x) ≤ α) ≤ α exactly (full conformal; ties count against x, so p is conservative). The rank-minimum's own
null distribution calibrates the combination of the four tails, whatever their dependence: a tail that carries no
information (a deterministic adapter's MI is 0 everywhere, so every point ties in both MI tails) costs nothing,
where Bonferroni, min(1, 4·min_t p_t), would still pay 4×. With four informative tails both have the same floor:
the most extreme point of each tail has rank 1, so p ≥ about 4/(n + 1) (0.016 at n = 250).

**Monitor.** `ShiftMonitor` tests online whether the stream of requests is still exchangeable with the calibration
items. Each request gets a smoothed online conformal p-value p_i = (#{A < A_i} + θ_i·#{A = A_i}) / |bag| over the
bag of the calibration items and every request seen so far in this test period (θ_i ~ U(0, 1]); under the null
(calibration items and stream i.i.d.) p_1, p_2, … are i.i.d. uniform (Vovk, Gammerman & Shafer, *Algorithmic
Learning in a Random World*, §8.1). The statistic is a conformal test martingale that bets on small p-values: its
capital is spread over power betting functions f_ε(p) = ε p^(ε−1), ε ∈ {0.1, …, 1} (ε = 1 bets nothing), and
before each step a share `jump` of it is spread evenly again (Vovk et al. 2021's "jumper"), so that after a long
calm some capital always sits on the aggressive bets and a shift is caught within tens of requests. Each f_ε
integrates to 1 on [0, 1] and the weights depend on the past only, so M_n = Π_i Σ_ε w_{i,ε} f_ε(p_i) is a
nonnegative martingale with M_0 = 1, and by Ville's inequality P(sup_n M_n ≥ c) ≤ 1/c.

One such martingale runs per *component*, each on its own online p-values: `extremeness` on A (the request's most
extreme tail, as above), and one per tail on that tail's oriented score alone (`epistemic_high`, `epistemic_low`,
`entropy_high`, `entropy_low`; p = the smoothed share of the bag at least as far out in that tail). A tail whose
calibration scores are all equal carries no information (a deterministic adapter's MI) and gets no component. Why
the tails: a shift that moves the bulk of one score without making single requests extreme (measured in
bench/results/shift.md: BoolQ roughly doubles DALorRA's MI while its requests' A stays unremarkable) leaves A's
p-values nearly uniform, so the `extremeness` martingale never grows, while the `epistemic_high` one does within
tens of requests. The statistic is max_k M_k over the C components, with the alarm at ≥ C/α: each M_k is a
test martingale in its own filtration, so P(sup_n M_k ≥ C/α) ≤ α/C, and by the union bound **guarantee:** within
one test period of `period` requests, the alarm (sticky until the period ends) is raised on in-distribution traffic
with probability at most α. The component that crossed first is reported (`alarm_by`): `epistemic_high` points to a
shift of task, `entropy_high` to one of domain. Each period starts afresh (bag = calibration items, every M_k = 1),
which bounds memory and keeps the test responsive after a long calm.

Beside the test the monitor keeps label-free context: how many requests had unfamiliarity below its level (in the
period and in the recent window), a histogram of their per-request p-values (uniform when nothing changed), and an
estimate of accuracy over the last `window` requests. The estimate is average thresholded confidence (ATC; Garg et
al., "Leveraging Unlabeled Data to Predict Out-of-Distribution Performance", ICLR 2022) in its negative-entropy
form: the share of recent requests whose entropy (the reference's second signal, H / log K for choices) is below a
threshold t fitted on the calibration items so that there the share below t equals their accuracy. ATC is right in
distribution even when the confidences are off by a constant amount (a temperature fitted on few items leaves the
adapter under- or overconfident), where the mean confidence is not; the entropy normalised by log K keeps it on one
scale across numbers of choices, where a confidence threshold fitted on 4-choice items passes every 2-choice item
(measured in bench/results/shift.md). References without t (older records) fall back to the mean calibrated
confidence. Neither is right under every
shift; the estimate's gap to the accuracy measured from feedback is itself a shift signal.
"""

from __future__ import annotations

import math
import random
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

N_TAILS = 4  # (epistemic high, epistemic low, entropy high, entropy low)
TAILS = ("epistemic_high", "epistemic_low", "entropy_high", "entropy_low")  # the rows of _oriented, named


def _oriented(epistemic: np.ndarray, entropy: np.ndarray) -> np.ndarray:
    """(4, n) oriented scores: larger = more extreme in that tail."""
    e, h = np.asarray(epistemic, np.float64), np.asarray(entropy, np.float64)
    return np.stack([e, -e, h, -h])


def _extremeness(r: np.ndarray, size: int) -> np.ndarray:
    """A = smallest rank · (size + 1) + second smallest, over the tails (axis 0): lexicographic (min, next)."""
    two = np.partition(r, 1, axis=0)[:2]
    return two[0] * (size + 1) + two[1]


def _ranks(o: np.ndarray) -> np.ndarray:
    """(4, n): rank_t(i) = #{k : o[t, k] ≥ o[t, i]} (each point counts itself)."""
    n = o.shape[1]
    s = np.sort(o, axis=1)
    return np.stack([n - np.searchsorted(s[t], o[t], side="left") for t in range(o.shape[0])])


@dataclass(frozen=True, eq=False)
class Reference:
    """The calibration items' (epistemic, entropy) pairs that requests are ranked against (see module docstring).

    `signals` names the two scores, e.g. ("epistemic_norm", "entropy_norm") for choices or ("epistemic_mean",
    "entropy_mean") for generated answers, so a reader cannot mix them up."""

    epistemic: np.ndarray  # (n,)
    entropy: np.ndarray  # (n,)
    signals: tuple[str, str] = ("epistemic_norm", "entropy_norm")
    accuracy_threshold: float | None = (
        None  # ATC's entropy threshold t (module docstring); None: mean confidence
    )
    calibration_accuracy: float | None = None  # the accuracy t was fitted to (for readers of the record)

    def __post_init__(self) -> None:
        e = np.asarray(self.epistemic, np.float64).reshape(-1)
        h = np.asarray(self.entropy, np.float64).reshape(-1)
        if len(e) != len(h):
            raise ValueError(
                f"reference: {len(e)} epistemic scores but {len(h)} entropy scores; they are pairs"
            )
        if len(e) < 1 or not (np.isfinite(e).all() and np.isfinite(h).all()):
            raise ValueError("reference: needs at least one calibration item and finite scores")
        t = self.accuracy_threshold
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t)):
            raise ValueError(f"reference: accuracy_threshold={t!r} must be a finite number or absent")
        o = _oriented(e, h)
        object.__setattr__(self, "epistemic", e)
        object.__setattr__(self, "entropy", h)
        object.__setattr__(self, "_o", o)
        object.__setattr__(self, "_ranks", _ranks(o))

    @property
    def n(self) -> int:
        return len(self.epistemic)

    @property
    def accuracy_estimate_method(self) -> str:
        """How a monitor on this reference estimates accuracy (module docstring)."""
        return (
            "mean calibrated confidence"
            if self.accuracy_threshold is None
            else "average thresholded confidence"
        )

    # ---- the record form: paired scores sorted by entropy, 8 significant digits ----------------------------
    def to_record(self) -> dict:
        order = np.lexsort((self.epistemic, self.entropy))
        return {
            "signals": list(self.signals),
            "method": "full-conformal rank-minimum over both tails of both scores",
            "n": self.n,
            "scores": [[_short(self.epistemic[i]), _short(self.entropy[i])] for i in order],
            **(
                {}
                if self.accuracy_threshold is None
                else {
                    "accuracy_threshold": _short(self.accuracy_threshold),
                    "calibration_accuracy": self.calibration_accuracy,
                    "accuracy_estimate": "average thresholded confidence (negative entropy): share of requests "
                    "whose entropy signal is below accuracy_threshold",
                }
            ),
        }

    @classmethod
    def from_record(cls, block: dict | None) -> Reference | None:
        """The reference stored in a decision record, or None when the record has none (older adapters)."""
        if not block or not block.get("scores"):
            return None
        pairs = np.asarray(block["scores"], np.float64)
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(
                f"reference scores: expected [[epistemic, entropy], ...], got shape {pairs.shape}"
            )
        signals = tuple(block.get("signals") or ("epistemic_norm", "entropy_norm"))
        return cls(
            pairs[:, 0],
            pairs[:, 1],
            signals,  # type: ignore[arg-type]
            block.get("accuracy_threshold"),
            block.get("calibration_accuracy"),
        )

    # ---- p-values ---------------------------------------------------------------------------------------
    def p_values(self, epistemic: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        """(B,) unfamiliarity p-values of B requests, each ranked in the bag of the n items and itself alone."""
        ox = _oriented(np.atleast_1d(epistemic), np.atleast_1d(entropy))  # (4, B)
        o, r = self._o, self._ranks  # (4, n)
        size = self.n + 1
        ge = o[:, None, :] >= ox[:, :, None]  # (4, B, n): calibration item at least as extreme as x
        a_x = _extremeness(1 + ge.sum(-1), size)  # (B,)
        a_cal = _extremeness(
            r[:, None, :] + (ox[:, :, None] >= o[:, None, :]), size
        )  # (B, n): x joins each tail
        return (1 + (a_cal <= a_x[:, None]).sum(-1)) / size

    def p_value(self, epistemic: float, entropy: float) -> float:
        return float(self.p_values(np.array([epistemic]), np.array([entropy]))[0])

    def leave_one_out(self) -> np.ndarray:
        """(n,) each calibration item's p-value against the other n − 1: what it would get as a request (used to
        certify the policy with its unfamiliarity rule on the same items). Its bag is the n items themselves, so
        one set of ranks serves every item."""
        a = _extremeness(self._ranks, self.n)  # type: ignore[attr-defined]
        return np.searchsorted(np.sort(a), a, side="right") / self.n


def _short(x: float) -> float:
    return float(f"{x:.8g}")


def atc_threshold(entropy: np.ndarray, correct: np.ndarray) -> float | None:
    """ATC's entropy threshold t: on these items, the share with entropy < t equals their accuracy (as nearly as
    the items' distinct entropies allow). None without items."""
    neg = -np.asarray(entropy, np.float64).reshape(-1)  # a confidence score: larger = surer
    if not len(neg):
        return None
    acc = float(np.mean(np.asarray(correct, np.float64)))
    t = float(np.quantile(neg, 1.0 - acc, method="inverted_cdf")) if acc < 1 else float(neg.min()) - 1e-9
    return -t  # share(neg > t) = share(entropy < -t)


# ---- the streaming monitor ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MonitorConfig:
    """Settings of one adapter's shift monitor (validated when built)."""

    alpha: float = 0.01  # P(false alarm within one period) ≤ alpha; alarm at max M_k ≥ C/alpha
    period: int = 10_000  # requests per test; then it restarts (memory and responsiveness are bounded)
    window: int = 200  # recent requests behind the accuracy estimate and the recent unfamiliar count
    unfamiliar_alpha: float = 0.05  # a request is counted unfamiliar when its p-value is below this
    bins: int = 10  # equal-width bins of the per-request p-value histogram on [0, 1]
    jump: float = 0.01  # share of the martingale's capital spread evenly over its bets before each request
    seed: int = 0  # the tie-breaking draws θ (reproducible monitors)

    def __post_init__(self) -> None:
        for name in ("alpha", "unfamiliar_alpha", "jump"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ValueError(f"monitor {name}={v!r}: must lie strictly between 0 and 1 (e.g. 0.01)")
        for name, lo in (("period", 10), ("window", 1), ("bins", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"monitor {name}={v!r}: must be an integer ≥ {lo}")


@dataclass(frozen=True)
class MonitorState:
    """A snapshot of the monitor (what the metrics exporter and /v1/adapters/{name} show)."""

    observed: int  # requests in the current test period
    statistic: float  # the largest component martingale M_k (1 at the start; ≥ threshold: alarm)
    threshold: float  # C / alpha over the C components (Bonferroni)
    alarm: bool  # M reached the threshold in this period (stays raised until the period ends or reset())
    alarm_at: int | None  # the request (1-based, within the period) that raised it
    periods: int  # test periods completed before this one
    unfamiliar: int  # requests in this period with unfamiliarity < unfamiliar_alpha
    unfamiliar_recent: int  # the same among the last `window` requests
    recent: int  # requests in the window (≤ window)
    histogram: tuple[
        int, ...
    ]  # per-request unfamiliarity p-values in this period, `bins` equal bins on [0, 1]
    accuracy_estimate: float | None  # ATC (or mean confidence) over the window (None before any request)
    accuracy_estimate_method: str = "mean calibrated confidence"  # or "average thresholded confidence"
    online_p: float | None = None  # the last request's online p-value of A (extremeness component)
    components: tuple[tuple[str, float], ...] = ()  # (component, its martingale M_k); statistic = max M_k
    alarm_by: str | None = None  # the component whose martingale raised the alarm


_EPS = np.arange(1, 11) / 10  # the power bets' exponents ε; ε = 1 is f = 1, capital kept aside


class ShiftMonitor:
    """Streaming exchangeability test of one adapter's traffic against its calibration items.

    Call `observe` once per answered-or-abstained request with its scores; read `state()`. Methods hold a lock,
    so one monitor may be shared by an asyncio loop and worker threads. Components (module docstring): the
    extremeness A, then each tail whose calibration scores are not all equal."""

    def __init__(self, reference: Reference, config: MonitorConfig | None = None) -> None:
        if not isinstance(reference, Reference):
            raise TypeError(
                f"ShiftMonitor needs a Reference (calibration scores), got {type(reference).__name__}"
            )
        self.reference = reference
        self.config = config or MonitorConfig()
        self._lock = threading.Lock()
        self._rng = random.Random(self.config.seed)
        self._periods = 0
        o = reference._o  # type: ignore[attr-defined]
        self._tails = [t for t in range(N_TAILS) if np.ptp(o[t]) > 0]  # informative tails only
        self.components = ("extremeness", *(TAILS[t] for t in self._tails))
        self._start()

    def _start(self) -> None:
        n, cap = self.reference.n, self.reference.n + self.config.period
        self._o = np.empty((N_TAILS, cap))
        self._r = np.empty((N_TAILS, cap), dtype=np.int64)
        self._o[:, :n], self._r[:, :n] = self.reference._o, self.reference._ranks  # type: ignore[attr-defined]
        self._size = n
        c = len(self.components)
        self._w = np.full((c, len(_EPS)), 1 / len(_EPS))  # per component, its capital's shares over the bets
        self._log_m = np.zeros(c)  # log M_k per component
        self._observed = 0
        self._alarm_at: int | None = None
        self._alarm_by: str | None = None
        self._last_p: float | None = None
        self._unfamiliar = 0
        self._hist = np.zeros(self.config.bins, dtype=np.int64)
        self._recent: deque[tuple[float, float, bool]] = deque(maxlen=self.config.window)

    @property
    def alarm(self) -> bool:
        """The alarm is raised in the current test period (cheaper than state() on every request)."""
        return self._alarm_at is not None

    def reset(self) -> None:
        """Start a new test period now (e.g. after an operator handled an alarm or the adapter was reloaded)."""
        with self._lock:
            self._periods += 1
            self._start()

    def observe(
        self, epistemic: float, entropy: float, confidence: float, unfamiliarity: float | None = None
    ) -> MonitorState:
        """Add one request: its uncertainty scores (the reference's signals), its calibrated confidence and,
        if already computed, its unfamiliarity p-value (else computed here)."""
        for name, v in (("epistemic", epistemic), ("entropy", entropy), ("confidence", confidence)):
            if not math.isfinite(v):
                raise ValueError(f"monitor: {name}={v!r} is not a finite number")
        if unfamiliarity is None:
            unfamiliarity = self.reference.p_value(epistemic, entropy)
        with self._lock:
            if self._observed >= self.config.period:
                self._periods += 1
                self._start()
            ox = _oriented(np.array([epistemic]), np.array([entropy]))[:, 0]  # (4,)
            n = self._size
            o, r = self._o[:, :n], self._r[:, :n]
            r += ox[:, None] >= o  # the newcomer is at least as extreme: every such point's rank grows
            self._o[:, n], self._r[:, n] = ox, 1 + (o >= ox[:, None]).sum(1)
            self._size = n + 1
            a = _extremeness(self._r[:, : n + 1], n + 1)  # (n+1,) A of every point in the bag
            a_new = a[n]
            ps = [(np.sum(a < a_new) + (1.0 - self._rng.random()) * np.sum(a == a_new)) / (n + 1)]
            bag = self._o[:, : n + 1]
            for t in self._tails:  # larger oriented score = further out in that tail; θ ~ U(0, 1] each
                ps.append(
                    (np.sum(bag[t] > ox[t]) + (1.0 - self._rng.random()) * np.sum(bag[t] == ox[t])) / (n + 1)
                )
            p = np.asarray(ps)[:, None]  # (C, 1)
            j = self.config.jump
            w = ((1 - j) * self._w + j / len(_EPS)) * _EPS * np.exp((_EPS - 1.0) * np.log(p))
            gain = w.sum(1)  # per component Σ_ε w_ε f_ε(p): E[gain] = 1 under the null
            self._log_m += np.log(gain)
            self._last_p = float(ps[0])
            self._w = w / gain[:, None]
            self._observed += 1
            if self._alarm_at is None and self._statistic() >= self.threshold:
                self._alarm_at = self._observed
                self._alarm_by = self.components[int(np.argmax(self._log_m))]
            unfamiliar = unfamiliarity < self.config.unfamiliar_alpha
            self._unfamiliar += unfamiliar
            self._hist[min(int(unfamiliarity * self.config.bins), self.config.bins - 1)] += 1
            self._recent.append((float(confidence), float(entropy), bool(unfamiliar)))
            return self._state()

    def _estimate(self) -> float | None:
        if not self._recent:
            return None
        t = self.reference.accuracy_threshold
        if t is None:
            return sum(c for c, _, _ in self._recent) / len(self._recent)
        return sum(h < t for _, h, _ in self._recent) / len(self._recent)

    def _statistic(self) -> float:
        """max_k M_k, compared with C / alpha: the Bonferroni combination of the components (module docstring)."""
        return _exp(float(self._log_m.max()))

    @property
    def threshold(self) -> float:
        return len(self.components) / self.config.alpha

    def state(self) -> MonitorState:
        with self._lock:
            return self._state()

    def _state(self) -> MonitorState:
        recent = len(self._recent)
        return MonitorState(
            observed=self._observed,
            statistic=self._statistic(),
            threshold=self.threshold,
            alarm=self._alarm_at is not None,
            alarm_at=self._alarm_at,
            periods=self._periods,
            unfamiliar=int(self._unfamiliar),
            unfamiliar_recent=sum(u for _, _, u in self._recent),
            recent=recent,
            histogram=tuple(int(x) for x in self._hist),
            accuracy_estimate=self._estimate(),
            accuracy_estimate_method=self.reference.accuracy_estimate_method,
            online_p=self._last_p,
            components=tuple((c, _exp(float(v))) for c, v in zip(self.components, self._log_m, strict=True)),
            alarm_by=self._alarm_by,
        )


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
