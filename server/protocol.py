"""Request and response models of the HTTP API. Imports only pydantic and the standard library:
the Python client reuses these models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 26


class PredictItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., min_length=1, description="The question text.")
    choices: list[str] = Field(
        ..., min_length=2, max_length=MAX_CHOICES, description="2 to 26 answer choices."
    )
    context: str | None = Field(None, description="Optional passage placed before the question.")
    adapter: str | None = Field(None, description="Adapter name (default: the server's default adapter).")
    samples: int | None = Field(
        None, ge=1, strict=True, description="Mask samples S (default: the adapter's)."
    )
    seed: int | None = Field(
        None, ge=0, strict=True, description="Mask seed; omit for the adapter's fixed draws."
    )
    fresh: bool = Field(False, description="Fresh random mask draws instead of the adapter's fixed ones.")
    return_samples: bool = Field(False, description="Include each sample's probabilities.")
    adaptive: bool | None = Field(
        None,
        description="Draw samples in rounds and stop once more cannot change the "
        "answer, the decision, or p_top / MI beyond the tolerance (samples is then the "
        "maximum). Default: the server's setting.",
    )
    min_confidence: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="Override: abstain below this confidence."
    )
    max_epistemic: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Override: abstain above this normalised mutual information.",
    )
    id: str | None = Field(None, max_length=128, description="Caller's id, echoed back.")


class PredictResponse(BaseModel):
    id: str
    adapter: str
    answer: str
    answer_index: int
    probabilities: list[float]
    confidence: float
    entropy: float
    entropy_norm: float
    aleatoric: float
    aleatoric_norm: float
    epistemic: float
    epistemic_norm: float
    decision: Literal["answer", "abstain"]
    abstain_reason: (
        Literal["low_confidence", "high_epistemic", "unfamiliar", "shift_alarm", "ambiguous_set"] | None
    )
    unfamiliarity: float | None = Field(
        None,
        description="Conformal p-value of this input's uncertainty scores (MI and entropy, both tails) against "
        "the adapter's calibration split: in-distribution inputs fall below α at rate ≤ α. None when the adapter "
        "stores no calibration reference.",
    )
    prediction_set: list[int]
    samples: int = Field(..., description="Mask draws actually scored (1 for a deterministic adapter).")
    choice_mass: float | None = Field(
        None,
        description="Probability the unrestricted model put on the choices "
        "(mean over samples); vLLM backend only.",
    )
    sample_probabilities: list[list[float]] | None = None
    cached: bool = Field(False, description="Answered from the seeded-result cache: scored before, not now.")
    latency_ms: float
    receipt: str = Field(..., description="Signed receipt; send it back to /feedback with the true label.")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    receipt: str = Field(..., min_length=1, max_length=4096)
    label: int = Field(
        ..., ge=0, strict=True, description="Index of the true answer among the prediction's choices."
    )


class FeedbackResponse(BaseModel):
    accepted: bool
    duplicate: bool
    correct: bool


class AdapterInfo(BaseModel):
    name: str
    loaded: bool
    method: str | None = None
    base_model: str | None = None
    rank: int | None = None
    p0: float | None = None
    mode: str | None = None
    keep_probability: dict[str, float] = {}
    temperature: float | None = None  # divides every mask's choice logits before averaging (1: not fitted)
    default_samples: int | None = None
    calibration: dict | None = None
    decision: dict | None = None
    validation: dict | None = None
    certified: bool | None = None  # the answer/abstain policy is a jointly certified fit
    shift: dict | None = None  # the label-free shift monitor's state (None: no calibration reference)


class AdapterList(BaseModel):
    default: str | None
    adapters: list[AdapterInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
