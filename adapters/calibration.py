"""Calibration metrics and decision calibration, in NumPy (the server imports this without torch).

Metrics over B items from p̄ (B, K) and labels y (B,): ACC, ECE (15 equal-width bins on top-1 confidence,
as torchmetrics' CalibrationError with norm="l1"), NLL (−log p̄_y), Brier (Σ_k (p̄_k − 1[k=y])²), AURC.
Decisions, fitted on a calibration split, never the test split:
  * abstention rules whose selective error is ≤ `target` with confidence 1−δ (Clopper–Pearson upper bound,
    tested in a fixed sequence from strict to loose, so the family-wise error stays ≤ δ): `fixed_sequence` for
    any path of rules (the served policy's joint path, adapters/decision.py), `fit_threshold` for one signal;
  * a split-conformal quantile for prediction sets with ≥ 1−α marginal coverage.
"""

from __future__ import annotations

import math
from typing import overload

import numpy as np

N_BINS = 15


@overload
def confidence_bin(conf: float, n_bins: int = ...) -> int: ...
@overload
def confidence_bin(conf: np.ndarray, n_bins: int = ...) -> np.ndarray: ...
def confidence_bin(conf: float | np.ndarray, n_bins: int = N_BINS) -> int | np.ndarray:
    """Bin i covers [i/n, (i+1)/n); confidence 1.0 falls in the last bin. Works on floats and arrays."""
    if np.isscalar(conf):
        return min(int(conf * n_bins), n_bins - 1) if conf >= 0 else 0
    return np.clip((np.asarray(conf) * n_bins).astype(np.int64), 0, n_bins - 1)


def bin_counts(
    conf: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: (count, Σ confidence, Σ correct) — exactly what the server's counters accumulate."""
    b = confidence_bin(conf, n_bins)
    n = np.bincount(b, minlength=n_bins).astype(np.float64)
    c = np.bincount(b, weights=conf, minlength=n_bins)
    a = np.bincount(b, weights=correct.astype(np.float64), minlength=n_bins)
    return n, c, a


def ece_from_bins(n: np.ndarray, conf_sum: np.ndarray, correct_sum: np.ndarray) -> float:
    """ECE = Σ_bins |Σconf − Σcorrect| / Σn (the PromQL form of DESIGN §4)."""
    total = n.sum()
    return float(np.abs(conf_sum - correct_sum).sum() / total) if total else float("nan")


def metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict[str, float]:
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    conf, pred = probs.max(-1), probs.argmax(-1)
    correct = (pred == labels).astype(np.float64)
    p_true = probs[np.arange(len(labels)), labels]
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return {
        "acc": float(correct.mean()),
        "ece": ece_from_bins(*bin_counts(conf, correct, n_bins)),
        "nll": float(-np.log(np.clip(p_true, 1e-12, None)).mean()),
        "brier": float(((probs - onehot) ** 2).sum(-1).mean()),
        "aurc": aurc(conf, correct),
        "n": int(len(labels)),
    }


def _tie_averaged_errors(conf: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Errors in order of decreasing confidence, each replaced by the mean error of its tie group: the expected
    error at every rank when items of equal confidence come in random order (no tie-breaking by input order)."""
    conf = np.asarray(conf, np.float64)
    order = np.argsort(-conf, kind="stable")
    c, err = conf[order], 1.0 - np.asarray(correct, np.float64)[order]
    starts = np.r_[0, np.flatnonzero(c[1:] != c[:-1]) + 1]  # first index of each tie group
    sizes = np.diff(np.r_[starts, len(c)])
    return np.repeat(np.add.reduceat(err, starts) / sizes, sizes) if len(c) else err


def aurc(conf: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk–coverage curve: mean over coverage levels i/n of the error among the i most confident,
    with risk averaged within groups of equal confidence."""
    err = _tie_averaged_errors(conf, correct)
    risks = np.cumsum(err) / np.arange(1, len(err) + 1)
    return float(risks.mean())


def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    err = _tie_averaged_errors(conf, correct)
    n = np.arange(1, len(err) + 1)
    return n / len(err), np.cumsum(err) / n


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half (Mann–Whitney U).

    E.g. positive = wrong answer and score = epistemic MI: how well MI ranks wrong answers above right ones
    (0.5 = no information). NaN when either class is empty."""
    score, positive = np.asarray(score, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s_sorted = score[order]
    i = 0
    while i < len(s_sorted):  # average ranks over ties
        j = i
        while j + 1 < len(s_sorted) and s_sorted[j + 1] == s_sorted[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tempered_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """NLL of p̄ = mean_s softmax(logits_s / T) for (S, B, K) logits: temperature applied to each sample."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    p = (e / e.sum(-1, keepdims=True)).mean(0)
    return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """One temperature T > 0 minimising the calibration split's NLL of mean_s softmax(logits_s / T).

    Grid search over log T, then golden-section refinement around the best grid point (NLL in log T is
    smooth and, for S = 1, convex). T > 1 softens an over-confident model; T = 1 changes nothing."""
    labels = np.asarray(labels, np.int64)
    grid = np.linspace(math.log(lo), math.log(hi), 61)
    vals = [tempered_nll(logits, labels, math.exp(g)) for g in grid]
    i = int(np.argmin(vals))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    gr = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - gr * (b - a), a + gr * (b - a)
        if tempered_nll(logits, labels, math.exp(c)) < tempered_nll(logits, labels, math.exp(d)):
            b = d
        else:
            a = c
    return float(math.exp((a + b) / 2))


# ---- decision calibration -----------------------------------------------------------------------------
def _binom_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    return min(
        1.0,
        sum(
            math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
            for i in range(k + 1)
        ),
    )


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """Exact one-sided (1−δ) upper bound on a binomial rate: the p with P(Bin(n, p) ≤ errors) = δ."""
    if n == 0:
        return 1.0
    if errors >= n:
        return 1.0
    lo, hi = errors / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _binom_cdf(errors, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def min_testable(target: float, delta: float, min_answered: int = 10) -> int:
    """The fewest answered items worth testing: 0 errors in m pass only when m ≥ log δ / log(1 − target), and
    steps below twice that would spend the sequence on bounds that can hardly pass. A count, not a label."""
    return max(min_answered, 2 * math.ceil(math.log(delta) / math.log(1 - target)))


def fixed_sequence(
    answered: np.ndarray, errors: np.ndarray, target: float, delta: float, min_answered: int = 10
) -> tuple[int | None, float | None]:
    """Fixed-sequence testing along a path of answer rules ordered from strict to loose (Bauer 1991; Angelopoulos
    et al. 2021, "Learn then Test"): step j answers `answered[j]` calibration items with `errors[j]` errors and is
    accepted when the Clopper–Pearson (1−δ) upper bound of its selective error is ≤ target; the scan stops at the
    first failure, so every accepted step holds together with probability ≥ 1−δ (δ spent once for the whole
    path). Steps answering fewer than `min_testable` items are skipped untested (their counts do not depend on
    labels). Returns (index of the loosest accepted step, its bound), or (None, None)."""
    start = min_testable(target, delta, min_answered)
    best: tuple[int | None, float | None] = (None, None)
    for j, (m, e) in enumerate(zip(answered, errors, strict=True)):
        if m < start:
            continue
        ucb = clopper_pearson_upper(int(e), int(m), delta)
        if ucb > target:
            break
        best = (j, ucb)
    return best


def fit_threshold(
    signal: np.ndarray,
    correct: np.ndarray,
    target: float,
    delta: float = 0.1,
    higher_is_surer: bool = True,
    min_answered: int = 10,
) -> dict:
    """Answer when signal ≥ t (confidence) or ≤ t (epistemic, higher_is_surer=False): one rule alone.

    Candidate thresholds are scanned from the strictest to the loosest by `fixed_sequence`. Returns the loosest
    accepted threshold, or {"valid": False, "reason": …}. The served policy certifies all its rules together
    (adapters/decision.py `fit_policy`); this fits a single signal."""
    s = np.asarray(signal, np.float64) if higher_is_surer else -np.asarray(signal, np.float64)
    order = np.argsort(-s, kind="stable")
    s_sorted, err = s[order], 1.0 - np.asarray(correct, np.float64)[order]
    cum_err = np.cumsum(err)
    n = len(s_sorted)
    # Candidates: every `step`-th answered count; a threshold answers every item tied with the last one.
    step = max(1, n // 50)
    ends = [_tie_end(s_sorted, m - 1) for m in range(min_testable(target, delta, min_answered), n + 1, step)]
    answered = np.array([j + 1 for j in ends], dtype=np.int64)
    errors = np.array([int(round(cum_err[j])) for j in ends], dtype=np.int64)
    k, ucb = fixed_sequence(answered, errors, target, delta, min_answered)
    base = {"target_error": target, "delta": delta, "n_calibration": n}
    if k is None:
        return {
            **base,
            "valid": False,
            "threshold": None,
            "reason": f"no threshold keeps the selective error ≤ {target} at confidence {1 - delta} "
            f"on {n} calibration items",
        }
    t = s_sorted[ends[k]] if higher_is_surer else -s_sorted[ends[k]]
    return {
        **base,
        "valid": True,
        "threshold": float(t),
        "coverage": int(answered[k]) / n,
        "selective_error": int(errors[k]) / int(answered[k]),
        "error_upper_bound": ucb,
    }


def _tie_end(s_sorted: np.ndarray, j: int) -> int:
    """The last index tied with index j in a sorted array."""
    while j + 1 < len(s_sorted) and s_sorted[j + 1] == s_sorted[j]:
        j += 1
    return j


def conformal_quantile(probs: np.ndarray, labels: np.ndarray, alpha: float = 0.1) -> dict:
    """Split conformal with score 1 − p̄_y: q̂ is the ⌈(n+1)(1−α)⌉/n empirical quantile."""
    scores = 1.0 - np.asarray(probs)[np.arange(len(labels)), np.asarray(labels)]
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return {
            "alpha": alpha,
            "valid": False,
            "qhat": None,
            "reason": f"{n} calibration items are too few for coverage {1 - alpha}",
        }
    qhat = float(np.sort(scores)[rank - 1])
    return {"alpha": alpha, "valid": True, "qhat": qhat, "n_calibration": n}


def prediction_set(probs: np.ndarray, qhat: float | None) -> list[int]:
    """{k : 1 − p̄_k ≤ q̂}; with no q̂, the top-1 answer alone."""
    probs = np.asarray(probs)
    if qhat is None:
        return [int(probs.argmax())]
    return [int(k) for k in np.nonzero(1.0 - probs <= qhat + 1e-12)[0]] or [int(probs.argmax())]
