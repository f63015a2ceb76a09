import math

import numpy as np
import pytest
import torch

from adapters.calibration import (
    clopper_pearson_upper,
    conformal_quantile,
    fit_threshold,
    metrics,
    prediction_set,
)
from adapters.uncertainty import concat_items, summarize


def test_hand_computed_two_samples():
    # Two samples that disagree completely: p1 = (1, 0), p2 = (0, 1) in the limit.
    logits = np.array([[[0.0, -np.inf]], [[-np.inf, 0.0]]])  # (S=2, B=1, K=2)
    s = summarize(logits)
    np.testing.assert_allclose(s["probabilities"], [[0.5, 0.5]])
    np.testing.assert_allclose(s["entropy"], [np.log(2)])
    np.testing.assert_allclose(s["aleatoric"], [0.0])
    np.testing.assert_allclose(s["epistemic"], [np.log(2)])  # all uncertainty is epistemic
    np.testing.assert_allclose(s["epistemic_norm"], [1.0])


def test_hand_computed_values():
    p1, p2 = np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.3, 0.2])
    s = summarize(np.log(np.stack([p1, p2]))[:, None, :])
    pbar = (p1 + p2) / 2
    H = -(pbar * np.log(pbar)).sum()
    A = (-(p1 * np.log(p1)).sum() - (p2 * np.log(p2)).sum()) / 2
    np.testing.assert_allclose(s["probabilities"][0], pbar)
    np.testing.assert_allclose(s["entropy"][0], H)
    np.testing.assert_allclose(s["aleatoric"][0], A)
    np.testing.assert_allclose(s["epistemic"][0], H - A)
    np.testing.assert_allclose(s["entropy_norm"][0], H / np.log(3))
    assert s["answer_index"][0] == 0 and s["confidence"][0] == pytest.approx(0.6)


@pytest.mark.parametrize("seed", range(5))
def test_properties(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(7, 5, 4)) * 3
    s = summarize(logits)
    np.testing.assert_allclose(s["probabilities"].sum(-1), 1.0)
    assert np.all(s["epistemic"] >= 0) and np.all(s["epistemic"] <= s["entropy"] + 1e-12)
    perm = summarize(logits[rng.permutation(7)])  # sample order does not matter
    for k in ("probabilities", "entropy", "epistemic"):
        np.testing.assert_allclose(perm[k], s[k])
    one = summarize(logits[:1])
    np.testing.assert_allclose(one["epistemic"], 0.0, atol=1e-12)


def test_mixed_k_padding():
    a = np.zeros((2, 1, 2))
    b = np.zeros((2, 1, 4))
    s = summarize(concat_items([a, b]))
    np.testing.assert_allclose(s["probabilities"][0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(s["entropy_norm"], [1.0, 1.0])


@pytest.mark.parametrize("seed", range(3))
def test_ece_equals_torchmetrics(seed):
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(4) * 0.5, size=500)
    labels = rng.integers(0, 4, size=500)
    ours = metrics(probs, labels)["ece"]
    ref = multiclass_calibration_error(
        torch.tensor(probs), torch.tensor(labels), num_classes=4, n_bins=15, norm="l1"
    )
    assert ours == pytest.approx(float(ref), abs=1e-6)


def test_metrics_hand_case():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0])
    m = metrics(probs, labels)
    assert m["acc"] == pytest.approx(0.75)  # argmax ties pick index 0
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.5])))
    assert m["brier"] == pytest.approx(np.mean([0.02, 0.72, 0.08, 0.5]))
    # bins: 0.9→13, 0.6→9, 0.8→12, 0.5→7: ECE = (|.9−1| + |.6−0| + |.8−1| + |.5−1|)/4
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.5) / 4)
    # AURC: by confidence 0.9(ok) 0.8(ok) 0.6(err) 0.5(ok): risks 0, 0, 1/3, 1/4
    assert m["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 4) / 4)


def test_clopper_pearson_is_the_exact_beta_quantile():
    # 0 errors in n: the bound solves (1 − p)^n = δ, i.e. 1 − δ^(1/n).
    assert clopper_pearson_upper(0, 50, 0.1) == pytest.approx(1 - 0.1 ** (1 / 50), rel=1e-9)
    # 5 errors in 100 at δ = 0.05: the 0.95 quantile of Beta(6, 95) is 0.102253 (R: qbeta(0.95, 6, 95)).
    ucb = clopper_pearson_upper(5, 100, 0.05)
    assert ucb == pytest.approx(0.1022534, abs=5e-7)
    # and it is where P(Bin(100, p) ≤ 5) = δ, computed here independently with exact integers
    cdf = sum(math.comb(100, i) * ucb**i * (1 - ucb) ** (100 - i) for i in range(6))
    assert cdf == pytest.approx(0.05, abs=1e-9)


@pytest.mark.parametrize("target", [0.1, 0.2])
def test_a_certified_threshold_misses_its_target_in_at_most_about_delta_of_draws(target):
    """Fit on fresh calibration draws, measure the true selective error of each fitted threshold: the share of draws
    that certify a threshold whose true error exceeds the target must stay ≤ δ (plus Monte Carlo slack); a refusal
    is no miss, and enough draws must certify for the check to mean something."""
    delta, draws, n = 0.1, 300, 400
    rng = np.random.default_rng(int(target * 100))
    misses = valid = 0
    for _ in range(draws):
        conf = rng.uniform(0.25, 1.0, n)
        correct = rng.uniform(size=n) < conf  # calibrated: P(correct | c) = c
        fit = fit_threshold(conf, correct, target=target, delta=delta)
        if not fit["valid"]:
            continue
        valid += 1
        misses += (1 - fit["threshold"]) / 2 > target  # the exact selective error of conf ≥ t for U(0.25, 1)
    assert valid >= draws / 3
    assert misses / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)


def test_threshold_meets_bound_on_synthetic_data():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.25, 1.0, size=4000)
    correct = rng.uniform(size=4000) < conf  # perfectly calibrated
    fit = fit_threshold(conf[:2000], correct[:2000], target=0.1, delta=0.1)
    assert fit["valid"] and fit["error_upper_bound"] <= 0.1
    # True selective error of a calibrated U(0.25, 1) confidence answering conf ≥ t is (1 − t) / 2.
    assert (1 - fit["threshold"]) / 2 <= 0.1
    assert fit_threshold(conf, np.zeros(4000, bool), target=0.05)["valid"] is False  # impossible: refused


def test_conformal_coverage_on_synthetic_data():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=4000)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    q = conformal_quantile(probs[:2000], labels[:2000], alpha=0.1)
    covered = [labels[i] in prediction_set(probs[i], q["qhat"]) for i in range(2000, 4000)]
    assert np.mean(covered) >= 0.88
    assert conformal_quantile(probs[:5], labels[:5], alpha=0.1)["valid"] is False


def test_sampling_settled_stops_only_when_nothing_can_change():
    from adapters.uncertainty import sampling_settled

    same = np.tile(np.log([[0.7, 0.2, 0.1]]), (4, 1))
    assert sampling_settled(same)  # identical samples: zero Monte Carlo error
    assert not sampling_settled(same[:1])  # one sample: no error estimate
    rng = np.random.default_rng(0)
    split = np.log(np.stack([[0.6, 0.4], [0.4, 0.6]] * 2))  # samples disagree on the answer
    assert not sampling_settled(split)
    noisy = np.log(
        np.clip(0.8 + rng.normal(0, 0.1, (4, 1)), 0.01, 0.99) * [1, 0]
        + [0, 1] * (1 - np.clip(0.8 + rng.normal(0, 0.1, (4, 1)), 0.01, 0.99))
    )
    assert not sampling_settled(noisy, tol=0.02)  # top probability known only to about ±0.1
    near = np.log(np.stack([[0.90, 0.10], [0.91, 0.09], [0.90, 0.10], [0.91, 0.09]]))
    assert sampling_settled(near, tol=0.02)
    assert not sampling_settled(near, min_confidence=0.904)  # the threshold lies inside the error band
    assert sampling_settled(near, min_confidence=0.8)


def test_evaluate_reports_mean_confidence_over_the_mask_average():
    from adapters.evaluate import evaluate_logits

    # two masks of one 2-choice item: probabilities (0.8, 0.2) and (0.4, 0.6) average to (0.6, 0.4)
    logits = torch.log(torch.tensor([[[0.8, 0.2]], [[0.4, 0.6]]])).numpy()
    m = evaluate_logits(logits, np.array([1]))
    assert m["mean_confidence"] == pytest.approx(0.6)
    assert m["acc"] == 0.0  # confident and wrong: mean_confidence − acc = +0.6, over-confident
