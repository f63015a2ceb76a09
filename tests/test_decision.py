"""The one answer/abstain policy (adapters/decision.py) and the adaptive rounds."""

import numpy as np
import pytest

from adapters.decision import DecisionPolicy, adaptive_rounds
from adapters.evaluate import abstain_mask

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
