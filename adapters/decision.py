"""The answer/abstain policy and the adaptive-sampling rounds: one home for both (the server, `dalorra eval` and
the benchmarks all use these). Pure Python + NumPy, no torch.

An adapter's record (dalorra.json, written by `dalorra train`) carries a decision block fitted on its calibration
split: a confidence threshold and a normalised-MI threshold, each `valid` only when the fit met its target, and a
conformal quantile. A request may override either threshold.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .calibration import prediction_set

FIXED_SEED = 0  # the default mask draws: the same question gets the same masks, hence the same answer


def _valid_threshold(block: dict | None) -> float | None:
    block = block or {}
    t = block.get("threshold")
    return float(t) if block.get("valid") and t is not None else None


@dataclass(frozen=True)
class DecisionPolicy:
    """When to abstain: confidence below `min_confidence`, else normalised MI above `max_epistemic`."""

    min_confidence: float | None = None
    max_epistemic: float | None = None  # on epistemic / log K
    conformal_qhat: float | None = None

    @classmethod
    def from_record(
        cls, decision: dict | None, min_confidence: float | None = None, max_epistemic: float | None = None
    ) -> DecisionPolicy:
        """The adapter's fitted (valid) thresholds, each replaced by a request's override when one is given."""
        d = decision or {}
        return cls(
            min_confidence if min_confidence is not None else _valid_threshold(d.get("confidence")),
            max_epistemic if max_epistemic is not None else _valid_threshold(d.get("epistemic")),
            (d.get("conformal") or {}).get("qhat"),
        )

    def reason(self, confidence: float, epistemic_norm: float) -> str | None:
        """None (answer) or why to abstain; the first rule that applies wins."""
        if self.min_confidence is not None and confidence < self.min_confidence:
            return "low_confidence"
        if self.max_epistemic is not None and epistemic_norm > self.max_epistemic:
            return "high_epistemic"
        return None

    def reasons(self, summary: dict[str, np.ndarray]) -> list[str | None]:
        """`reason` for every item of an `uncertainty.summarize` result."""
        return [
            self.reason(float(c), float(e))
            for c, e in zip(summary["confidence"], summary["epistemic_norm"], strict=True)
        ]

    def prediction_set(self, probabilities: np.ndarray) -> list[int]:
        return prediction_set(probabilities, self.conformal_qhat)


def adaptive_rounds(total: int, first: int, step: int) -> Iterator[int]:
    """Sizes of adaptive sampling's rounds up to `total` draws: `first`, then `step` at a time (the last one cut)."""
    n = 0
    while n < total:
        size = min(first if n == 0 else step, total - n)
        yield size
        n += size
