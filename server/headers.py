"""Uncertainty in HTTP response headers, for clients and wrappers that drop unknown body fields.

LangChain's `ChatOpenAI` keeps neither the per-choice `uncertainty` object nor unknown top-level fields, but with
`include_response_headers=True` it returns the response headers in `response_metadata["headers"]`. So every
non-streaming OpenAI-compatible response that carries uncertainty, and every single-item /predict response, also
states it in headers (README "Uncertainty in response headers"):

    x-dalorra-kind             multiple_choice | generation
    x-dalorra-confidence       top-1 probability of the choices; a generated answer's exp(mean log p̄(y_t))
    x-dalorra-epistemic        the score the epistemic threshold compares: MI / log K for choices, the mean
                               per-token MI in nats for a generated answer
    x-dalorra-decision         answer | abstain
    x-dalorra-abstain-reason   the reason code, or "none" when answered
    x-dalorra-unfamiliarity    the conformal p-value, only when the response has one

With several choices (n > 1, or several prompts) each header lists one value per choice, in choice order,
separated by ", ". Headers hold numbers and codes only, never request text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PREFIX = "x-dalorra-"


def _number(x: object) -> str:
    return f"{float(x):.6g}"


def _epistemic(u: Mapping) -> object:
    return (
        u["epistemic_norm"] if u.get("kind", "multiple_choice") == "multiple_choice" else u["epistemic_mean"]
    )


def uncertainty_headers(uncertainties: Sequence[Mapping | None]) -> dict[str, str]:
    """Headers for a response's choices' uncertainty objects (a /predict response's fields, or a generated
    answer's `uncertainty`); none when any choice has none (the uncertainty pass was skipped)."""
    if not uncertainties or any(u is None for u in uncertainties):
        return {}
    us: list[Mapping] = list(uncertainties)  # type: ignore[arg-type]
    out = {
        "kind": ", ".join(str(u.get("kind", "multiple_choice")) for u in us),
        "confidence": ", ".join(_number(u["confidence"]) for u in us),
        "epistemic": ", ".join(_number(_epistemic(u)) for u in us),
        "decision": ", ".join(str(u["decision"]) for u in us),
        "abstain-reason": ", ".join(str(u.get("abstain_reason") or "none") for u in us),
    }
    if all(u.get("unfamiliarity") is not None for u in us):
        out["unfamiliarity"] = ", ".join(_number(u["unfamiliarity"]) for u in us)
    return {PREFIX + k: v for k, v in out.items()}
