"""calibration.auroc against a brute-force pairwise count, AURC with tied confidences, and fit_temperature on data
with a known temperature."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapters.calibration import aurc, auroc, fit_temperature, risk_coverage, tempered_nll


def _brute_auroc(score, positive) -> float:
    """P(s_pos > s_neg) + ½ P(s_pos = s_neg) over every (positive, negative) pair."""
    pos = [s for s, p in zip(score, positive, strict=True) if p]
    neg = [s for s, p in zip(score, positive, strict=True) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_the_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    score = rng.integers(0, 6, n).astype(float) / 5  # few distinct values: many ties
    positive = rng.random(n) < 0.4
    positive[0], positive[1] = True, False  # both classes present
    assert auroc(score, positive) == pytest.approx(_brute_auroc(score, positive), abs=1e-12)


def test_auroc_hand_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5  # all tied: no information
    assert auroc([0.3, 0.1, 0.3, 0.2], [True, False, False, True]) == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert math.isnan(auroc([0.1, 0.2], [True, True])) and math.isnan(auroc([0.1, 0.2], [False, False]))


def test_aurc_averages_risk_within_tied_confidences():
    """Items of equal confidence have no order: the risk at each coverage level is its expectation over their
    orderings, so AURC cannot depend on the input order of ties."""
    conf = np.array([0.9, 0.5, 0.5, 0.5, 0.2])
    correct = np.array([1, 1, 0, 0, 1.0])
    # tie group {0.5}: mean error 2/3 at each of its three ranks; cumulative errors 0, 2/3, 4/3, 2, 2
    want = np.mean([0 / 1, (2 / 3) / 2, (4 / 3) / 3, 2 / 4, 2 / 5])
    assert aurc(conf, correct) == pytest.approx(want, abs=1e-12)
    perm = np.array([0, 3, 2, 1, 4])  # the same items with the tied ones in another order
    assert aurc(conf[perm], correct[perm]) == pytest.approx(want, abs=1e-12)
    cov, risk = risk_coverage(conf, correct)
    assert cov.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and risk[-1] == pytest.approx(2 / 5)
    # no ties: the plain running error
    assert aurc(np.array([0.9, 0.8, 0.6, 0.5]), np.array([1, 1, 0, 1.0])) == pytest.approx(
        (0 + 0 + 1 / 3 + 1 / 4) / 4
    )


def _labels_at_temperature(T0: float, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels y ~ softmax(z / T0): data for which T0 is the calibrating temperature."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, k))
    p = np.exp(z / T0 - (z / T0).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = (rng.random((n, 1)) > p.cumsum(-1)).sum(-1)  # inverse-CDF sampling per row
    return z, np.minimum(y, k - 1)


@pytest.mark.parametrize("T0", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(T0):
    z, y = _labels_at_temperature(T0, 20000, 4, seed=int(T0 * 10))
    T = fit_temperature(z[None], y)  # (S = 1, B, K)
    assert T == pytest.approx(T0, rel=0.05)
    assert tempered_nll(z[None], y, T) <= tempered_nll(z[None], y, 1.0) + 1e-12  # never worse than no scaling
    assert tempered_nll(z[None], y, T) <= min(
        tempered_nll(z[None], y, T * f) for f in (0.9, 1.1)
    )  # a minimum


def test_fit_temperature_of_identical_samples_is_the_single_sample_fit():
    """S copies of the same logits average to the same p̄, so S changes nothing."""
    z, y = _labels_at_temperature(1.7, 4000, 3, seed=1)
    one = fit_temperature(z[None], y)
    assert fit_temperature(np.repeat(z[None], 4, 0), y) == pytest.approx(one, rel=1e-6)
