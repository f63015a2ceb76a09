"""Generated answers: requests and results, and the pure math of their uncertainty and decision.

A generated answer is decoded by the *mean-mask* network (every rank switch at its expectation,
z = σ(φ): one deterministic LoRA, DESIGN §1 "inference" with E[z] in place of a draw), then its tokens
y_1..y_T are scored teacher-forced under S hard mask draws z_1..z_S in one batched forward
(adapters/generate.py). With p_{s,t} = p(· | prompt, y_<t; z_s) over the whole vocabulary and
p̄_t = (1/S) Σ_s p_{s,t}:

  entropy_t    H[p̄_t]                        total uncertainty of the next-token distribution (nats)
  aleatoric_t  (1/S) Σ_s H[p_{s,t}]
  epistemic_t  H[p̄_t] − (1/S) Σ_s H[p_{s,t}]  mutual information between y_t and the mask (≥ 0)
  loglik_s     Σ_t log p_{s,t}(y_t)           the answer's log-likelihood under mask s
  confidence   exp((1/T) Σ_t log p̄_t(y_t))   geometric-mean probability of the answer's tokens

The distributions are the raw next-token ones (temperature 1): an adapter's fitted temperature is a property of
its K-way choice logits, not of the vocabulary. No torch here: the server and the offline fit (`dalorra train`,
`dalorra eval --generation-set`, adapters/short_answers.py) summarise, decide and fit with these functions. The
answer/abstain policy is adapters/decision.py's, the same as for choices: `generation_policy(record)` parses a
generation decision record, `decide_generated(policy, summary, request_settings(req, prompt_form))` applies it
(reason "not_calibrated_for_settings" when the request's decoding, length, prompt form or S differ from the fit's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .decision import DEFAULT_UNFAMILIAR_ALPHA, AbstentionPolicy, fit_policy


@dataclass(frozen=True)
class GenerateRequest:
    adapter: str
    prompt: str | None = None  # /v1/completions: raw text, the tokenizer's special tokens added
    messages: tuple[tuple[str, str], ...] | None = (
        None  # /v1/chat/completions: (role, content), chat template
    )
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # sampling seed (None: fresh)
    n: int = 1
    top_logprobs: int | None = None  # None: no log-probs; 0: the chosen token's only; k: also the top k
    samples: int = 10  # mask draws S of the uncertainty pass; 0 skips the pass
    mask_seed: int = 0  # the adapter's fixed draws by default, like /predict
    ignore_eos: bool = (
        False  # keep decoding past end-of-sequence (vLLM's extension; benchmarks of fixed length)
    )


@dataclass
class TokenScores:
    """One answer scored under S masks: per-token arrays of length T, per-mask log-likelihoods (S, T)."""

    entropy: np.ndarray  # (T,)
    aleatoric: np.ndarray  # (T,)
    epistemic: np.ndarray  # (T,)
    mask_logprobs: np.ndarray  # (S, T): log p_{s,t}(y_t)
    mean_logprobs: np.ndarray  # (T,): log p̄_t(y_t)


@dataclass
class GeneratedChoice:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    token_ids: list[int] = field(
        default_factory=list
    )  # the scored tokens (EOS included when it ended the answer)
    tokens: list[str] = field(default_factory=list)  # their text, one entry per token
    logprobs: list[float] | None = None  # the mean network's log p(y_t), T = 1 (not the sampling temperature)
    top_logprobs: list[list[tuple[str, float]]] | None = None
    scores: TokenScores | None = None


@dataclass
class GenerateResult:
    prompt_tokens: int
    choices: list[GeneratedChoice]
    samples: int = 0  # distinct mask draws scored (1 for a deterministic adapter)
    decode_seconds: float = 0.0  # mean-mask decoding
    score_seconds: float = 0.0  # the S-mask uncertainty pass


def summarize_answer(sc: TokenScores) -> dict:
    """Sequence-level summary of one answer's token scores (definitions in the module docstring)."""
    T = len(sc.entropy)
    if T == 0:  # nothing was generated (cancelled before the first token)
        return {
            "tokens": 0,
            "entropy_mean": 0.0,
            "entropy_max": 0.0,
            "epistemic_mean": 0.0,
            "epistemic_max": 0.0,
            "aleatoric_mean": 0.0,
            "loglik_mean": 0.0,
            "loglik_std": 0.0,
            "loglik": 0.0,
            "confidence": 1.0,
        }
    ll_s = sc.mask_logprobs.sum(1)  # (S,)
    return {
        "tokens": T,
        "entropy_mean": float(sc.entropy.mean()),
        "entropy_max": float(sc.entropy.max()),
        "epistemic_mean": float(sc.epistemic.mean()),
        "epistemic_max": float(sc.epistemic.max()),
        "aleatoric_mean": float(sc.aleatoric.mean()),
        "loglik_mean": float(ll_s.mean()),  # mean over masks of the answer's log-likelihood
        "loglik_std": float(ll_s.std()),  # its spread across masks (population std; 0 when S = 1)
        "loglik": float(sc.mean_logprobs.sum()),  # log-likelihood under the model average p̄
        "confidence": float(np.exp(sc.mean_logprobs.mean())),
    }


def request_settings(req: GenerateRequest, prompt_form: str) -> dict:
    """What a generated answer's thresholds depend on, in the form the fitted record stores (its "request"), to
    pass as `settings` to `AbstentionPolicy.decide`. `prompt_form` names how the prompt was made, e.g.
    short_answers' "the adapter's cloze prompt" (the form `dalorra train` fits on), or "chat template"."""
    return {
        "prompt": prompt_form,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": list(req.stop),
        "max_tokens": req.max_tokens,
        "samples": req.samples,
    }


def generation_policy(
    record: dict | None, min_confidence: float | None = None, max_epistemic: float | None = None
) -> AbstentionPolicy:
    """The generated-answer policy of a generation decision record (its joint thresholds, unfamiliarity reference
    of (epistemic_mean, entropy_mean) and fitted request settings), with a request's overrides."""
    return AbstentionPolicy.from_record(record, min_confidence, max_epistemic)


def decide_generated(policy: AbstentionPolicy, summary: dict, settings: dict | None = None) -> str | None:
    """The abstain reason code (None: answer) of one summarised answer under the whole policy: settings check,
    confidence, mean MI, unfamiliarity of (epistemic_mean, entropy_mean)."""
    u = policy.unfamiliarity(summary["epistemic_mean"], summary["entropy_mean"])
    return policy.decide(summary["confidence"], summary["epistemic_mean"], u, settings=settings)


def decide(summary: dict, min_confidence: float | None, max_epistemic: float | None) -> str | None:
    """The older two-threshold call (confidence, then mean MI): `decide_generated` without unfamiliarity or
    settings, kept for callers that hold thresholds rather than a policy."""
    return AbstentionPolicy(min_confidence, max_epistemic).decide(
        summary["confidence"], summary["epistemic_mean"]
    )


def thresholds_of(record: dict | None) -> tuple[float | None, float | None]:
    """(min_confidence, max_epistemic) from a fitted generation decision record (the jointly certified ones in
    newer records); invalid fits give None."""
    p = AbstentionPolicy.from_record(record)
    return p.min_confidence, p.max_epistemic


def fit_generation_decision(
    confidence: np.ndarray,
    epistemic_mean: np.ndarray,
    correct: np.ndarray,
    target_error: float,
    delta: float = 0.1,
    entropy_mean: np.ndarray | None = None,
    unfamiliar_alpha: float = DEFAULT_UNFAMILIAR_ALPHA,
) -> dict:
    """Thresholds for generated answers, certified together exactly as the choice policy is (decision.fit_policy:
    one fixed-sequence path, Clopper–Pearson, δ spent once). With `entropy_mean` the record also stores the
    unfamiliarity reference. The caller adds the "request" settings it generated with (short_answers)."""
    fit = fit_policy(
        confidence,
        epistemic_mean,
        entropy_mean,
        correct,
        target_error,
        delta,
        unfamiliar_alpha,
        signals=("confidence", "epistemic_mean", "entropy_mean"),
    )
    return {"signal": {"confidence": "exp(mean log p̄(y_t))", "epistemic": "mean_t MI_t (nats)"}, **fit}
