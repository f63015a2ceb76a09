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
