"""DESIGN §1's inference-time quantities: pure NumPy functions over an (S, B, K) array of choice logits.

No torch here: the server's batcher reduces backend output with these functions.
A missing choice (items with fewer than K choices) has logit −inf and probability 0.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; −inf entries get probability 0."""
    z = logits - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    """−Σ_k p_k log p_k over the last axis (nats), with 0·log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -t.sum(axis=-1)


def n_choices(logits: np.ndarray) -> np.ndarray:
    """K of each item: choices finite in any sample: (S, B, K) → (B,)."""
    return np.isfinite(logits).any(0).sum(-1)


def summarize(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Bayesian model average over S samples of (S, B, K) logits.

    probabilities p̄ = mean_s softmax(logits_s)           (B, K)
    entropy       H[p̄]                                  (B,)
    aleatoric     mean_s H[p_s]                          (B,)
    epistemic     H[p̄] − mean_s H[p_s]  (mutual information, ≥ 0; 0 when S = 1)
    *_norm        divided by log K (K = the item's own number of choices)
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 3:
        raise ValueError(f"expected (S, B, K) logits, got shape {logits.shape}")
    p_s = softmax(logits)  # (S, B, K)
    p = p_s.mean(0)  # (B, K)
    H = entropy(p)  # (B,)
    alea = entropy(p_s).mean(0)  # (B,)
    epi = np.clip(H - alea, 0.0, None)  # clip: float rounding can give −1e-17
    logk = np.log(n_choices(logits).astype(np.float64))
    return {
        "probabilities": p,
        "answer_index": p.argmax(-1),
        "confidence": p.max(-1),
        "entropy": H,
        "aleatoric": alea,
        "epistemic": epi,
        "entropy_norm": H / logk,
        "aleatoric_norm": alea / logk,
        "epistemic_norm": epi / logk,
    }


def concat_items(chunks: list[np.ndarray]) -> np.ndarray:
    """Join (S, B_i, K_i) logit arrays along B, padding K with −inf."""
    kmax = max(c.shape[2] for c in chunks)
    padded = [np.pad(c, ((0, 0), (0, 0), (0, kmax - c.shape[2])), constant_values=-np.inf) for c in chunks]
    return np.concatenate(padded, axis=1)


def sampling_settled(
    logits: np.ndarray,
    min_confidence: float | None = None,
    max_epistemic: float | None = None,
    tol: float = 0.02,
    z: float = 2.0,
) -> bool:
    """Adaptive sampling's stopping rule for one item's (n, K) logits: True when more samples are unlikely
    to change anything that matters.

    With p_s = softmax(logits_s) and Monte Carlo standard errors over the n samples (jackknife for the
    normalised MI), it asks for all of:
      * the answer cannot flip: mean(p_top − p_second) > z · se of that difference;
      * the top probability is known to ± tol: z · se(p_top) ≤ tol, and so is the normalised MI;
      * neither abstention threshold lies within z · se of its signal (confidence; normalised MI).
    n < 2 never settles (no error estimate). z = 2 is a two-sided ≈95% band.
    """
    logits = np.asarray(logits, dtype=np.float64)
    n = logits.shape[0]
    if n < 2:
        return False
    p = softmax(logits)
    pbar = p.mean(0)
    order = np.argsort(-pbar)
    top, second = order[0], order[1]
    d = p[:, top] - p[:, second]
    if d.mean() <= z * d.std(ddof=1) / np.sqrt(n):
        return False
    se_top = p[:, top].std(ddof=1) / np.sqrt(n)
    if z * se_top > tol:
        return False
    if min_confidence is not None and abs(pbar[top] - min_confidence) <= z * se_top:
        return False
    logk = np.log(np.isfinite(logits).any(0).sum())

    def mi(ps: np.ndarray) -> float:
        return max(0.0, float(entropy(ps.mean(0)) - entropy(ps).mean())) / logk

    full = mi(p)
    loo = np.array([mi(np.delete(p, i, axis=0)) for i in range(n)])
    se_mi = np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())
    if z * se_mi > tol:
        return False
    if max_epistemic is not None and abs(full - max_epistemic) <= z * se_mi:
        return False
    return True
