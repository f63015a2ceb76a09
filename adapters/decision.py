"""The answer/abstain policy, one for K-way choices and generated answers, certified as a whole; and the adaptive
sampling rounds. Pure Python + NumPy, no torch (the server, `dalorra eval` and the benchmarks all use this).

**API.** An adapter's record carries a decision block (dalorra.json "decision" for choices, the generation
decision file for generated answers). Parse it once into a typed, frozen policy and ask it per request:

    policy = AbstentionPolicy.from_record(record["decision"], min_confidence=None, max_epistemic=None,
                                          unfamiliar_alpha=None)       # request / server overrides
    u = policy.unfamiliarity(epistemic_norm, entropy_norm)             # conformal p-value, or None (no reference)
    reason = policy.decide(confidence, epistemic_norm, u)              # None (answer) or a REASONS code
    reason = policy.decide(confidence, epistemic_norm, u, shift_alarm=True)  # the adapter's shift alarm is up
    reason = policy.decide(conf, epi_mean, u, settings=request_settings)  # generated answers: + settings check
    policy.prediction_set(probabilities)                               # split-conformal set (choices)

Signals: choices use (confidence = max p̄ after the temperature, epistemic = MI / log K, entropy = H / log K);
generated answers use (geometric-mean token probability, mean token MI, mean token entropy), named in the record's
`reference.signals`. `DecisionPolicy` is the same class under its old name; `.reason(conf, epi)` is
`decide(conf, epi)` without the unfamiliarity rule, so older callers keep working.

**The rules** (reason codes in REASONS; the first that applies wins):
  low_confidence              confidence < min_confidence
  high_epistemic              epistemic > max_epistemic
  unfamiliar                  unfamiliarity < α_u AND (confidence < strict min_confidence OR epistemic > strict
                              max_epistemic): an input unlike the calibration split must pass stricter rules
  shift_alarm                 the adapter's shift monitor has raised its alarm (the traffic as a whole no longer
                              looks like the calibration split, adapters/shift.py) AND the input fails the same
                              stricter rules: while the alarm is up every request is treated as unfamiliar
                              (server setting DALORRA_SHIFT_ACTION=strict, the default; `alert` only reports)
  not_calibrated_for_settings (generated answers) the request's decoding, length, prompt form or S differ from
                              those the thresholds were fitted on, so no certified decision exists for it

Why `unfamiliar` needs a second rule: unfamiliarity says the input's uncertainty scores are unusual, not that the
answer is wrong. On a benign shift (another set the adapter answers as well as its own) abstaining on every
unfamiliar input would discard answers confidence has right; on a harmful one the shifted inputs that remain
answered are the most confident ones with low MI. So unfamiliarity tightens the answer rule instead of replacing
it: the strict confidence threshold is the one the same path gives at half the answered count, and the strict
epistemic threshold is the calibration items' median MI (a deterministic adapter's MI is 0 and always passes).
α_u defaults to 0.05: in distribution at most 5 % of requests are unfamiliar (by construction, adapters/shift.py),
and only those failing the strict rules abstain, so in-distribution coverage falls by under 5 points; a smaller
α_u cannot flag anything with ~250 calibration items unless it is rarer than 1 in 250.

**Certified as a whole** (`fit_policy`, called by `dalorra train` and `dalorra recalibrate`): the calibration
split is divided once by a seeded permutation: the first third fits the temperature (and chooses the path's
shape), the rest fits everything else (split-conformal quantile, the unfamiliarity reference, the thresholds), so
the items that certify the thresholds are exchangeable with in-distribution requests at the fitted temperature.
A path of joint rules runs from strict to loose: step m answers the m most confident items (threshold c_m), the
MI rule drops the share ρ·(1 − m/n) of highest-MI items (ρ chosen on the temperature part from RHO_GRID, by
empirical coverage at the target there), and the unfamiliarity rule applies with its strict thresholds at m/2.
Each step's answered set is the set all rules answer together (unfamiliarity of a calibration item is its
leave-one-out p-value); steps are tested in order with a Clopper–Pearson bound at δ and the scan stops at the
first failure (calibration.fixed_sequence), so δ is spent once. The loosest accepted step is the policy. A
request that overrides a threshold gets an uncertified policy (`certified` False).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .calibration import fixed_sequence, min_testable, prediction_set
from .shift import Reference, atc_threshold

FIXED_SEED = 0  # the default mask draws: the same question gets the same masks, hence the same answer

LOW_CONFIDENCE = "low_confidence"
HIGH_EPISTEMIC = "high_epistemic"
UNFAMILIAR = "unfamiliar"
SHIFT_ALARM = "shift_alarm"
NOT_CALIBRATED = "not_calibrated_for_settings"
REASONS = (LOW_CONFIDENCE, HIGH_EPISTEMIC, UNFAMILIAR, SHIFT_ALARM, NOT_CALIBRATED)

DEFAULT_UNFAMILIAR_ALPHA = 0.05
RHO_GRID = (0.0, 0.1, 0.2, 0.3)  # shares of the highest-MI items the strictest step drops
DEFAULT_RHO = 0.1  # when no disjoint part is given to choose ρ on (generated answers)
STRICT_EPISTEMIC_QUANTILE = 0.5
# request settings a generated answer's thresholds depend on (mask_seed does not: fresh and fixed draws are alike)
SETTINGS_KEYS = ("prompt", "temperature", "top_p", "stop", "max_tokens", "samples")


@dataclass(frozen=True)
class UnfamiliarRule:
    """Abstain when unfamiliarity < alpha and the input fails these stricter thresholds (None: no such rule)."""

    alpha: float = DEFAULT_UNFAMILIAR_ALPHA
    min_confidence: float | None = None
    max_epistemic: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(
                f"unfamiliar alpha={self.alpha!r}: must lie strictly between 0 and 1 (e.g. 0.05)"
            )

    def fails(self, confidence: float, epistemic: float) -> bool:
        return (self.min_confidence is not None and confidence < self.min_confidence) or (
            self.max_epistemic is not None and epistemic > self.max_epistemic
        )


def _valid_threshold(block: dict | None) -> float | None:
    block = block or {}
    t = block.get("threshold")
    return float(t) if block.get("valid") and t is not None else None


@dataclass(frozen=True)
class AbstentionPolicy:
    """When to abstain (module docstring). Build with `from_record`; every field is already validated."""

    min_confidence: float | None = None
    max_epistemic: float | None = None  # on the record's epistemic signal (MI / log K for choices)
    conformal_qhat: float | None = None
    unfamiliar: UnfamiliarRule | None = None
    reference: Reference | None = field(default=None, compare=False, repr=False)
    settings: Mapping[str, Any] | None = field(default=None, compare=False)  # generated answers: fitted with
    certified: bool = False  # the thresholds are a jointly certified fit, not overridden by a request
    target_error: float | None = None
    delta: float | None = None

    @classmethod
    def from_record(
        cls,
        decision: dict | None,
        min_confidence: float | None = None,
        max_epistemic: float | None = None,
        unfamiliar_alpha: float | None = None,
    ) -> AbstentionPolicy:
        """The record's policy, a request's threshold overrides applied. Reads jointly fitted records ("policy"
        block) and older ones (separately fitted "confidence"/"epistemic" blocks: no unfamiliarity rule)."""
        d = decision or {}
        joint = d.get("policy") or {}
        if joint:
            valid = bool(joint.get("valid"))
            conf = joint.get("min_confidence") if valid else None
            epi = joint.get("max_epistemic") if valid else None
            u = joint.get("unfamiliar") if valid else None
            rule = (
                UnfamiliarRule(
                    float(unfamiliar_alpha if unfamiliar_alpha is not None else u["alpha"]),
                    u.get("min_confidence"),
                    u.get("max_epistemic"),
                )
                if u
                else None
            )
        else:
            valid, rule = False, None
            conf, epi = _valid_threshold(d.get("confidence")), _valid_threshold(d.get("epistemic"))
        overridden = min_confidence is not None or max_epistemic is not None
        return cls(
            min_confidence=min_confidence if min_confidence is not None else conf,
            max_epistemic=max_epistemic if max_epistemic is not None else epi,
            conformal_qhat=(d.get("conformal") or {}).get("qhat"),
            unfamiliar=rule,
            reference=Reference.from_record(d.get("reference")),
            settings=d.get("request"),
            certified=valid and not overridden,
            target_error=joint.get("target_error"),
            delta=joint.get("delta"),
        )

    def unfamiliarity(self, epistemic: float, entropy: float) -> float | None:
        """The conformal p-value of the input's (epistemic, entropy) against the calibration items; None when the
        record stores no reference (older adapters)."""
        return None if self.reference is None else self.reference.p_value(epistemic, entropy)

    def decide(
        self,
        confidence: float,
        epistemic: float,
        unfamiliarity: float | None = None,
        settings: Mapping[str, Any] | None = None,
        shift_alarm: bool = False,
    ) -> str | None:
        """None (answer) or the abstain reason code; `settings` (generated answers) are checked first.
        `shift_alarm`: the adapter's shift monitor has raised its alarm, so every input must pass the strict rule."""
        if settings is not None and self.settings_mismatch(settings):
            return NOT_CALIBRATED
        if self.min_confidence is not None and confidence < self.min_confidence:
            return LOW_CONFIDENCE
        if self.max_epistemic is not None and epistemic > self.max_epistemic:
            return HIGH_EPISTEMIC
        if (
            self.unfamiliar is not None
            and unfamiliarity is not None
            and unfamiliarity < self.unfamiliar.alpha
            and self.unfamiliar.fails(confidence, epistemic)
        ):
            return UNFAMILIAR
        if shift_alarm and self.unfamiliar is not None and self.unfamiliar.fails(confidence, epistemic):
            return SHIFT_ALARM
        return None

    def answered(
        self,
        confidence: np.ndarray,
        epistemic: np.ndarray,
        unfamiliarity: np.ndarray | None = None,
        shift_alarm: bool = False,
    ) -> np.ndarray:
        """(B,) bool: which of B items `decide` answers (vectorised, for offline evaluation; no settings check)."""
        if shift_alarm and self.unfamiliar is not None:
            unfamiliarity = np.zeros(len(np.atleast_1d(confidence)))  # every input must pass the strict rule
        c, e = np.asarray(confidence, np.float64), np.asarray(epistemic, np.float64)
        ok = np.ones(len(c), bool)
        if self.min_confidence is not None:
            ok &= c >= self.min_confidence
        if self.max_epistemic is not None:
            ok &= e <= self.max_epistemic
        if self.unfamiliar is not None and unfamiliarity is not None:
            r = self.unfamiliar
            fails = np.zeros(len(c), bool)
            if r.min_confidence is not None:
                fails |= c < r.min_confidence
            if r.max_epistemic is not None:
                fails |= e > r.max_epistemic
            ok &= ~((np.asarray(unfamiliarity) < r.alpha) & fails)
        return ok

    def reason(self, confidence: float, epistemic_norm: float) -> str | None:
        """The older two-rule call: `decide` without unfamiliarity."""
        return self.decide(confidence, epistemic_norm)

    def reasons(self, summary: dict[str, np.ndarray]) -> list[str | None]:
        """`decide` for every item of an `uncertainty.summarize` result (unfamiliarity when it has entropy)."""
        conf, epi = summary["confidence"], summary["epistemic_norm"]
        if self.reference is not None and "entropy_norm" in summary:
            u: list[float | None] = list(self.reference.p_values(epi, summary["entropy_norm"]))
        else:
            u = [None] * len(conf)
        return [self.decide(float(c), float(e), ui) for c, e, ui in zip(conf, epi, u, strict=True)]

    def settings_mismatch(self, settings: Mapping[str, Any]) -> list[str]:
        """The request settings that differ from those the thresholds were fitted on (empty: they apply).

        Keys of SETTINGS_KEYS that the fitted record names are compared; a key the request leaves out counts as
        different. top_p is ignored when both decode greedily (temperature 0). No fitted settings: nothing to
        compare (choices)."""
        if not self.settings:
            return []
        fitted = self.settings
        out = []
        for k in SETTINGS_KEYS:
            if k not in fitted:
                continue
            if k == "top_p" and fitted.get("temperature") == 0 and settings.get("temperature") == 0:
                continue
            got, want = settings.get(k), fitted[k]
            if k == "stop":
                got, want = sorted(got or []), sorted(want or [])
            if got != want:
                out.append(k)
        return out

    def settings_match(self, settings: Mapping[str, Any]) -> bool:
        return not self.settings_mismatch(settings)

    def prediction_set(self, probabilities: np.ndarray) -> list[int]:
        return prediction_set(probabilities, self.conformal_qhat)


DecisionPolicy = AbstentionPolicy  # the name the server and older code use


# ---- fitting -------------------------------------------------------------------------------------------------
def split_calibration(n: int, seed: int, temperature_share: float = 1 / 3) -> tuple[np.ndarray, np.ndarray]:
    """Indices (temperature part, decision part) of a calibration split of n items: a seeded permutation, the first
    round(share·n) items fit the temperature and the path's shape, the rest everything else."""
    if not 0 < temperature_share < 1:
        raise ValueError(f"temperature_share={temperature_share}: must lie strictly between 0 and 1")
    perm = np.random.default_rng(seed).permutation(n)
    k = min(max(1, round(temperature_share * n)), n - 1) if n > 1 else 0
    return np.sort(perm[:k]), np.sort(perm[k:])


@dataclass(frozen=True)
class _Step:
    min_confidence: float
    max_epistemic: float | None
    strict_confidence: float


def _path(conf: np.ndarray, epi: np.ndarray, rho: float, target: float, delta: float) -> list[_Step]:
    """Joint rules from strict to loose: step m answers (by confidence) the m most confident items; the MI rule
    keeps the ⌈n(1 − ρ(1 − m/n))⌉ lowest-MI ones; unfamiliar inputs need the confidence of step m/2."""
    n = len(conf)
    c = np.sort(conf)[::-1]
    e = np.sort(epi)
    step = max(1, n // 50)
    out = []
    for m in range(min(min_testable(target, delta), n), n + 1, step):
        k = math.ceil(n * (1 - rho * (1 - m / n)))
        out.append(
            _Step(
                float(c[m - 1]), float(e[k - 1]) if rho > 0 and k < n else None, float(c[max(1, m // 2) - 1])
            )
        )
    return out


def _answered(
    step: _Step,
    conf: np.ndarray,
    epi: np.ndarray,
    unfam: np.ndarray | None,
    alpha: float,
    strict_epi: float | None,
) -> np.ndarray:
    ok = conf >= step.min_confidence
    if step.max_epistemic is not None:
        ok &= epi <= step.max_epistemic
    if unfam is not None:
        fails = conf < step.strict_confidence
        if strict_epi is not None:
            fails |= epi > strict_epi
        ok &= ~((unfam < alpha) & fails)
    return ok


def choose_rho(conf: np.ndarray, epi: np.ndarray, correct: np.ndarray, target: float, delta: float) -> float:
    """The path shape ρ of RHO_GRID with the most empirical coverage at selective error ≤ target on a part of the
    calibration split disjoint from the one that certifies (so choosing it spends no δ); ties: the smaller ρ."""
    best, best_cov = RHO_GRID[0], -1.0
    err = 1.0 - np.asarray(correct, np.float64)
    for rho in RHO_GRID:
        cov = 0.0
        for st in _path(conf, epi, rho, target, delta):
            ok = _answered(st, conf, epi, None, 1.0, None)
            if ok.any() and err[ok].mean() <= target:
                cov = max(cov, float(ok.mean()))
        if cov > best_cov + 1e-12:
            best, best_cov = rho, cov
    return best


def fit_policy(
    confidence: np.ndarray,
    epistemic: np.ndarray,
    entropy: np.ndarray | None,
    correct: np.ndarray,
    target_error: float,
    delta: float = 0.1,
    unfamiliar_alpha: float = DEFAULT_UNFAMILIAR_ALPHA,
    shape: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    signals: tuple[str, str, str] = ("confidence", "epistemic_norm", "entropy_norm"),
) -> dict:
    """The jointly certified policy record (module docstring) from the decision part's signals.

    `shape`: (confidence, epistemic, correct) of the disjoint temperature part, to choose ρ on (None: DEFAULT_RHO).
    `entropy` None: no unfamiliarity reference, so no unfamiliarity rule (the record says so).
    Returns {"confidence", "epistemic" (older readers' view of the joint thresholds), "policy", "reference"}."""
    conf = np.asarray(confidence, np.float64)
    epi = np.asarray(epistemic, np.float64)
    ent = np.asarray(entropy, np.float64) if entropy is not None else None
    correct = np.asarray(correct, np.float64)
    n = len(conf)
    if not (len(epi) == len(correct) == n and (ent is None or len(ent) == n)):
        raise ValueError(
            "fit_policy: confidence, epistemic, entropy and correct must have one value per item"
        )
    if not 0 < target_error < 1 or not 0 < delta < 1:
        raise ValueError(
            f"target_error={target_error}, delta={delta}: both must lie strictly between 0 and 1"
        )
    base = {"target_error": target_error, "delta": delta, "n_calibration": n}
    rho = choose_rho(*shape, target_error, delta) if shape is not None and len(shape[0]) else DEFAULT_RHO
    reference = (
        Reference(epi, ent, signals[1:], atc_threshold(ent, correct), float(correct.mean()))  # type: ignore[arg-type]
        if n and ent is not None
        else None
    )
    unfam = reference.leave_one_out() if reference is not None else None
    strict_epi = float(np.quantile(epi, STRICT_EPISTEMIC_QUANTILE, method="inverted_cdf")) if n else None
    path = _path(conf, epi, rho, target_error, delta) if n else []
    masks = [_answered(st, conf, epi, unfam, unfamiliar_alpha, strict_epi) for st in path]
    answered = np.array([int(m.sum()) for m in masks], dtype=np.int64)
    errors = np.array([int(round((1 - correct[m]).sum())) for m in masks], dtype=np.int64)
    k, ucb = fixed_sequence(answered, errors, target_error, delta)
    how = {
        "test": "fixed-sequence Clopper–Pearson along the path (δ spent once)",
        "steps": len(path),
        "epistemic_share": rho,
        "epistemic_share_chosen_on": "the temperature part" if shape is not None else "default",
        "signals": dict(zip(("confidence", "epistemic", "entropy"), signals, strict=True)),
    }
    if k is None:
        why = (
            f"no joint rule keeps the selective error ≤ {target_error} at confidence {1 - delta} on {n} "
            "calibration items"
        )
        invalid = {**base, "valid": False, "threshold": None, "reason": why}
        return {
            "confidence": invalid,
            "epistemic": invalid,
            "policy": {**base, "valid": False, "reason": why, "path": how},
            "reference": reference.to_record() if reference is not None else None,
        }
    st, m = path[k], masks[k]
    stats = {
        "coverage": float(m.mean()),
        "selective_error": float((1 - correct[m]).mean()),
        "error_upper_bound": ucb,
    }
    policy = {
        **base,
        "valid": True,
        "min_confidence": st.min_confidence,
        "max_epistemic": st.max_epistemic,
        "unfamiliar": None
        if reference is None
        else {
            "alpha": unfamiliar_alpha,
            "min_confidence": st.strict_confidence,
            "max_epistemic": strict_epi,
            "rule": "abstain when unfamiliarity < alpha and (confidence < min_confidence or epistemic > "
            "max_epistemic)",
        },
        **stats,
        "unfamiliar_calibration": int((unfam < unfamiliar_alpha).sum()) if unfam is not None else 0,
        "path": {**how, "accepted_step": k},
    }
    joint = {**base, "valid": True, "joint": True, **stats}
    epi_block = (
        {**joint, "threshold": st.max_epistemic}
        if st.max_epistemic is not None
        else {
            **base,
            "valid": False,
            "threshold": None,
            "reason": "the certified joint policy has no MI rule",
        }
    )
    return {
        "confidence": {**joint, "threshold": st.min_confidence},
        "epistemic": epi_block,
        "policy": policy,
        "reference": reference.to_record() if reference is not None else None,
    }


def fit_decision(
    logits: np.ndarray,
    labels: np.ndarray,
    target_error: float,
    delta: float = 0.1,
    conformal_alpha: float = 0.1,
    unfamiliar_alpha: float = DEFAULT_UNFAMILIAR_ALPHA,
    temperature_scaling: bool = True,
    seed: int = 0,
) -> tuple[float, dict, dict]:
    """Everything fitted on a calibration split's (S, B, K) choice logits, as `dalorra train`/`recalibrate` do.

    With temperature scaling the split is divided by `split_calibration(B, seed)`: T is fitted by NLL on the
    temperature part, which also chooses the path shape; the conformal quantile, the unfamiliarity reference and
    the joint thresholds are fitted on the decision part at that T. Without it, T = 1 and every item is in the
    decision part. Returns (T, the temperature fit's record, the decision record)."""
    from .calibration import conformal_quantile, fit_temperature, tempered_nll
    from .uncertainty import summarize

    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    n = logits.shape[1]
    if temperature_scaling and n >= 2:
        t_idx, d_idx = split_calibration(n, seed)
        T = fit_temperature(logits[:, t_idx], labels[t_idx])
        temp = {
            "items": len(t_idx),
            "nll_before": tempered_nll(logits[:, t_idx], labels[t_idx], 1.0),
            "nll_after": tempered_nll(logits[:, t_idx], labels[t_idx], T),
        }
        st = summarize(logits[:, t_idx] / T)
        shape = (st["confidence"], st["epistemic_norm"], (st["answer_index"] == labels[t_idx]).astype(float))
    else:
        t_idx, d_idx, T, temp, shape = np.array([], np.int64), np.arange(n), 1.0, {}, None
    s = summarize(logits[:, d_idx] / T)
    y = labels[d_idx]
    decision = fit_policy(
        s["confidence"],
        s["epistemic_norm"],
        s["entropy_norm"],
        (s["answer_index"] == y).astype(np.float64),
        target_error,
        delta,
        unfamiliar_alpha,
        shape=shape,
    )
    decision["conformal"] = conformal_quantile(s["probabilities"], y, conformal_alpha)
    split = {
        "how": f"seeded permutation (seed {seed}) of the calibration split"
        if len(t_idx)
        else "no temperature fitted: every item fits the decision",
        "temperature_items": len(t_idx),
        "decision_items": len(d_idx),
        "temperature_part": "fits the temperature and chooses the path shape",
        "decision_part": "fits the joint thresholds, the unfamiliarity reference and the conformal quantile",
    }
    decision["policy"]["split"] = split
    return T, temp, decision


def adaptive_rounds(total: int, first: int, step: int) -> Iterator[int]:
    """Sizes of adaptive sampling's rounds up to `total` draws: `first`, then `step` at a time (the last one cut)."""
    n = 0
    while n < total:
        size = min(first if n == 0 else step, total - n)
        yield size
        n += size
