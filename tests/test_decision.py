"""The one answer/abstain policy (adapters/decision.py): reading records old and new, its rules, the settings check
for generated answers, the joint certification (fit_policy, fit_decision), and the adaptive rounds."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from adapters.calibration import fit_temperature
from adapters.decision import (
    HIGH_EPISTEMIC,
    LOW_CONFIDENCE,
    NOT_CALIBRATED,
    REASONS,
    SHIFT_ALARM,
    UNFAMILIAR,
    AbstentionPolicy,
    DecisionPolicy,
    UnfamiliarRule,
    adaptive_rounds,
    fit_decision,
    fit_policy,
    split_calibration,
)
from adapters.evaluate import abstain_mask
from adapters.shift import Reference

RECORD = {
    "confidence": {"valid": True, "threshold": 0.6},
    "epistemic": {"valid": False, "threshold": 0.01},
    "conformal": {"valid": True, "qhat": 0.8},
}


def test_only_valid_fitted_thresholds_apply_and_requests_override_them():
    p = DecisionPolicy.from_record(RECORD)
    assert (p.min_confidence, p.max_epistemic, p.conformal_qhat) == (0.6, None, 0.8)
    q = DecisionPolicy.from_record(RECORD, min_confidence=0.3, max_epistemic=0.05)
    assert (q.min_confidence, q.max_epistemic) == (0.3, 0.05)
    assert DecisionPolicy.from_record(None) == DecisionPolicy()


@pytest.mark.parametrize(
    ("conf", "epi", "want"),
    [
        (0.5, 0.0, "low_confidence"),
        (0.5, 0.9, "low_confidence"),
        (0.7, 0.9, "high_epistemic"),
        (0.7, 0.01, None),
    ],
)
def test_reason_low_confidence_first(conf, epi, want):
    assert DecisionPolicy(min_confidence=0.6, max_epistemic=0.05).reason(conf, epi) == want


def test_eval_abstains_exactly_where_the_policy_does():
    s = {"confidence": np.array([0.5, 0.9, 0.7]), "epistemic_norm": np.array([0.0, 0.2, 0.0])}
    record = {**RECORD, "epistemic": {"valid": True, "threshold": 0.1}}
    mask, reasons = abstain_mask(s, record)
    assert reasons == ["low_confidence", "high_epistemic", None]
    assert mask.tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("total", "first", "step", "want"),
    [(10, 4, 3, [4, 3, 3]), (11, 4, 3, [4, 3, 3, 1]), (3, 4, 3, [3]), (0, 4, 3, [])],
)
def test_adaptive_rounds(total, first, step, want):
    assert list(adaptive_rounds(total, first, step)) == want


# ---- the jointly certified policy ------------------------------------------------------------------------------
DEFAULT_RECORD = Path(__file__).resolve().parent.parent / "adapters/default/arc-easy-dalorra/dalorra.json"


# the decision block adapters wrote before the joint policy (the shipped default adapter's, until it was recalibrated)
OLDER_DECISION = {
    "confidence": {
        "coverage": 0.418,
        "delta": 0.1,
        "error_upper_bound": 0.195,
        "n_calibration": 225,
        "selective_error": 0.138,
        "target_error": 0.2,
        "threshold": 0.6452,
        "valid": True,
    },
    "conformal": {"alpha": 0.1, "n_calibration": 225, "qhat": 0.8561, "valid": True},
    "epistemic": {
        "delta": 0.1,
        "n_calibration": 225,
        "reason": "no threshold keeps the selective error ≤ 0.2 at confidence 0.9 on 225 calibration items",
        "target_error": 0.2,
        "threshold": None,
        "valid": False,
    },
}


def test_an_older_record_with_separately_fitted_thresholds_still_loads():
    p = AbstentionPolicy.from_record(OLDER_DECISION)
    assert p.min_confidence == pytest.approx(0.6452)
    assert p.max_epistemic is None and p.unfamiliar is None and p.reference is None
    assert not p.certified  # each threshold was certified alone, never the two together
    assert p.unfamiliarity(0.01, 0.5) is None
    assert p.decide(0.3, 0.0, None) == LOW_CONFIDENCE and p.reason(0.99, 0.0) is None
    assert DecisionPolicy is AbstentionPolicy


def test_the_shipped_default_adapter_has_a_jointly_certified_policy_with_an_unfamiliarity_rule():
    rec = json.loads(DEFAULT_RECORD.read_text())
    p = AbstentionPolicy.from_record(rec["decision"])
    assert p.certified and p.unfamiliar is not None and p.reference is not None
    assert rec["default_samples"] == rec["recalibrated"]["samples"]  # served at the S it was fitted at


UNF = UnfamiliarRule(alpha=0.05, min_confidence=0.8, max_epistemic=0.02)


@pytest.mark.parametrize(
    ("conf", "epi", "u", "want"),
    [
        (0.4, 0.0, 0.5, LOW_CONFIDENCE),
        (0.7, 0.2, 0.5, HIGH_EPISTEMIC),
        (0.7, 0.01, 0.5, None),  # familiar: the ordinary rules alone
        (0.7, 0.01, 0.01, UNFAMILIAR),  # unfamiliar and below the strict confidence
        (0.9, 0.05, 0.01, UNFAMILIAR),  # unfamiliar and above the strict MI
        (0.9, 0.01, 0.01, None),  # unfamiliar but passes the strict rules: answered
        (0.9, 0.01, None, None),  # no p-value (older adapter): the rule cannot apply
    ],
)
def test_unfamiliar_abstains_only_together_with_a_strict_rule(conf, epi, u, want):
    p = AbstentionPolicy(min_confidence=0.5, max_epistemic=0.1, unfamiliar=UNF)
    assert p.decide(conf, epi, u) == want
    assert want is None or want in REASONS


@pytest.mark.parametrize(
    ("conf", "epi", "u", "want"),
    [
        (0.7, 0.01, 0.5, SHIFT_ALARM),  # familiar, but the traffic has shifted: the strict rule applies
        (0.9, 0.01, 0.5, None),  # passes the strict rule: answered through the alarm
        (0.7, 0.01, 0.01, UNFAMILIAR),  # unfamiliar itself: the per-request reason comes first
        (0.4, 0.0, 0.5, LOW_CONFIDENCE),  # the ordinary rules still come first
    ],
)
def test_a_raised_shift_alarm_puts_every_input_under_the_strict_rule(conf, epi, u, want):
    p = AbstentionPolicy(min_confidence=0.5, max_epistemic=0.1, unfamiliar=UNF)
    assert p.decide(conf, epi, u, shift_alarm=True) == want
    assert p.decide(conf, epi, u) == (
        UNFAMILIAR if want == UNFAMILIAR else want if want != SHIFT_ALARM else None
    )
    c, e, uu = np.array([conf]), np.array([epi]), np.array([u])
    assert bool(p.answered(c, e, uu, shift_alarm=True)[0]) == (want is None)
    assert (
        AbstentionPolicy(min_confidence=0.5).decide(0.7, 0.01, 0.5, shift_alarm=True) is None
    )  # no strict rule


SETTINGS = {"prompt": "cloze", "temperature": 0.0, "stop": ["\n", "."], "max_tokens": 8, "samples": 10}


def test_generated_answer_thresholds_apply_only_to_the_settings_they_were_fitted_on():
    p = AbstentionPolicy.from_record(
        {
            "confidence": {"valid": True, "threshold": 0.5},
            "epistemic": {"valid": False, "threshold": None},
            "request": {**SETTINGS, "mask_seed": 0},
        }
    )
    same = {
        **SETTINGS,
        "stop": (".", "\n"),
        "top_p": 0.3,
        "mask_seed": 7,
    }  # order, greedy top_p, seed: no matter
    assert p.settings_match(same) and p.decide(0.9, 0.0, settings=same) is None
    longer = {**SETTINGS, "max_tokens": 64}
    assert p.settings_mismatch(longer) == ["max_tokens"]
    assert p.decide(0.9, 0.0, settings=longer) == NOT_CALIBRATED
    sampled = {**SETTINGS, "temperature": 0.7, "prompt": "chat template"}
    assert p.settings_mismatch(sampled) == ["prompt", "temperature"]
    assert p.settings_mismatch({k: v for k, v in SETTINGS.items() if k != "samples"}) == ["samples"]
    assert AbstentionPolicy().settings_match({"anything": 1})  # choices: no fitted settings to compare


def _draw(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Items where confidence alone is not enough: high MI halves the chance of being right."""
    conf = rng.uniform(0.3, 1.0, n)
    epi = rng.exponential(0.02, n)
    p_right = np.where(epi > 0.04, conf * 0.5, conf)
    ent = np.clip(1 - conf + rng.normal(0, 0.05, n), 0, 1)
    return {"conf": conf, "epi": epi, "ent": ent, "p_right": p_right, "right": rng.uniform(size=n) < p_right}


def test_fit_policy_certifies_the_answered_set_of_all_rules_together():
    rng = np.random.default_rng(4)
    d, shape = _draw(rng, 400), _draw(rng, 150)
    rec = fit_policy(
        d["conf"],
        d["epi"],
        d["ent"],
        d["right"],
        0.2,
        0.1,
        shape=(shape["conf"], shape["epi"], shape["right"]),
    )
    pol = rec["policy"]
    assert pol["valid"] and pol["error_upper_bound"] <= 0.2 and pol["n_calibration"] == 400
    p = AbstentionPolicy.from_record(rec)
    assert p.certified and p.unfamiliar is not None and p.reference is not None and p.reference.n == 400
    # the record's coverage and error are those of every rule together, each item's unfamiliarity leave-one-out
    u = Reference(
        d["epi"], d["ent"]
    ).leave_one_out()  # the record stores the pairs sorted: use the input order
    answered = np.array([p.decide(c, e, ui) is None for c, e, ui in zip(d["conf"], d["epi"], u, strict=True)])
    assert answered.mean() == pytest.approx(pol["coverage"])
    assert (p.answered(d["conf"], d["epi"], u) == answered).all()  # the vectorised form agrees
    assert 1 - d["right"][answered].mean() == pytest.approx(pol["selective_error"])
    # the older readers see the joint thresholds
    assert rec["confidence"]["threshold"] == p.min_confidence and rec["confidence"]["joint"]
    assert AbstentionPolicy.from_record(rec, min_confidence=0.9).certified is False
    assert AbstentionPolicy.from_record(rec, unfamiliar_alpha=0.01).unfamiliar.alpha == 0.01


def test_fit_policy_says_when_no_joint_rule_meets_the_target():
    rng = np.random.default_rng(1)
    d = _draw(rng, 200)
    rec = fit_policy(d["conf"], d["epi"], d["ent"], np.zeros(200, bool), 0.05, 0.1)
    assert not rec["policy"]["valid"] and "no joint rule" in rec["policy"]["reason"]
    assert not rec["confidence"]["valid"] and not rec["epistemic"]["valid"]
    p = AbstentionPolicy.from_record(rec)
    assert (p.min_confidence, p.max_epistemic, p.unfamiliar, p.certified) == (None, None, None, False)
    with pytest.raises(ValueError, match="one value per item"):
        fit_policy(d["conf"], d["epi"][:5], d["ent"], d["right"], 0.2)


def test_a_certified_joint_policy_misses_its_target_in_at_most_about_delta_of_draws():
    """Fit on fresh calibration draws; the true selective error of the fitted policy (all rules, on a large fresh
    sample, from each item's known chance of being right) exceeds the target in ≤ δ of draws (+ slack)."""
    rng = np.random.default_rng(2)
    target, delta, draws = 0.2, 0.1, 120
    misses = valid = 0
    for _ in range(draws):
        d, shape, fresh = _draw(rng, 300), _draw(rng, 100), _draw(rng, 2000)
        rec = fit_policy(
            d["conf"],
            d["epi"],
            d["ent"],
            d["right"],
            target,
            delta,
            shape=(shape["conf"], shape["epi"], shape["right"]),
        )
        p = AbstentionPolicy.from_record(rec)
        if not p.certified:
            continue
        valid += 1
        u = p.reference.p_values(fresh["epi"], fresh["ent"])
        ok = p.answered(fresh["conf"], fresh["epi"], u)
        misses += (1 - fresh["p_right"][ok]).mean() > target
    assert valid >= draws / 2
    assert misses / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)


def test_fit_decision_fits_the_temperature_on_items_disjoint_from_the_thresholds():
    rng = np.random.default_rng(3)
    S, B, K = 3, 90, 4
    logits = rng.normal(0, 2, (S, B, K))
    labels = np.where(rng.uniform(size=B) < 0.7, logits.mean(0).argmax(-1), rng.integers(0, K, B))
    T, temp, dec = fit_decision(logits, labels, target_error=0.3, delta=0.1, seed=5)
    t_idx, d_idx = split_calibration(B, 5)
    assert set(t_idx).isdisjoint(d_idx) and len(t_idx) + len(d_idx) == B and len(t_idx) == 30
    assert T == pytest.approx(fit_temperature(logits[:, t_idx], labels[t_idx]))
    assert temp["items"] == 30 and dec["policy"]["split"]["decision_items"] == 60
    assert dec["policy"]["n_calibration"] == 60 and dec["conformal"]["n_calibration"] == 60
    assert dec["reference"]["n"] == 60 and dec["reference"]["signals"] == ["epistemic_norm", "entropy_norm"]
    assert dec["policy"]["path"]["epistemic_share_chosen_on"] == "the temperature part"
    T1, temp1, dec1 = fit_decision(logits, labels, target_error=0.3, temperature_scaling=False)
    assert T1 == 1.0 and temp1 == {} and dec1["policy"]["n_calibration"] == B
