"""Evaluation: adapter × items → (S, B, K) logits → uncertainty, calibration metrics, decision metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from .calibration import conformal_quantile, fit_threshold, metrics, risk_coverage
from .data import Item
from .decision import DecisionPolicy
from .scoring import encode, score
from .uncertainty import concat_items, summarize

if TYPE_CHECKING:
    from .model import DalorraModel


@torch.no_grad()
def predict_logits(
    model: DalorraModel,
    items: list[Item],
    samples: int = 10,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "eval",
) -> np.ndarray:
    """(S, B, K) choice logits for all items, batch_size questions × S masks per forward."""
    was_training = model.training
    model.eval()
    enc = encode(items, model.tokenizer, model.fmt)
    chunks = []
    for i in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, leave=False):
        chunks.append(
            score(
                model, items[i : i + batch_size], samples=samples, seed=seed, encoded=enc[i : i + batch_size]
            )
        )
    model.train(was_training)
    return concat_items(chunks)


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, decision: dict | None = None) -> dict:
    """Metrics of DESIGN §1 plus mean entropy / MI and, given a decision record, coverage and risk."""
    s = summarize(logits)
    out = metrics(s["probabilities"], labels)
    out["mean_confidence"] = float(s["confidence"].mean())  # minus acc: > 0 over-, < 0 under-confident
    out["mean_entropy"] = float(s["entropy"].mean())
    out["mean_epistemic"] = float(s["epistemic"].mean())
    if decision:
        out.update(decision_report(s, labels, decision))
    return out


def calibrate_decisions(
    logits: np.ndarray, labels: np.ndarray, target_error: float = 0.2, delta: float = 0.1, alpha: float = 0.1
) -> dict:
    """Fit abstention thresholds (confidence; epistemic MI) and a conformal quantile on a calibration split."""
    s = summarize(logits)
    correct = (s["answer_index"] == labels).astype(np.float64)
    return {
        "confidence": fit_threshold(s["confidence"], correct, target_error, delta, higher_is_surer=True),
        "epistemic": fit_threshold(s["epistemic_norm"], correct, target_error, delta, higher_is_surer=False),
        "conformal": conformal_quantile(s["probabilities"], labels, alpha),
    }


def abstain_mask(s: dict, decision: dict) -> tuple[np.ndarray, list[str | None]]:
    """Which items abstain under a decision record, and why (the server's policy: adapters/decision.py)."""
    reasons = DecisionPolicy.from_record(decision).reasons(s)
    return np.array([r is not None for r in reasons]), reasons


def decision_report(s: dict, labels: np.ndarray, decision: dict) -> dict:
    abstain, _ = abstain_mask(s, decision)
    correct = s["answer_index"] == labels
    answered = ~abstain
    out = {
        "coverage": float(answered.mean()),
        "selective_error": float(1 - correct[answered].mean()) if answered.any() else None,
    }
    policy = DecisionPolicy.from_record(decision)
    if policy.conformal_qhat is not None:
        sets = [policy.prediction_set(p) for p in s["probabilities"]]
        out["set_coverage"] = float(np.mean([labels[i] in st for i, st in enumerate(sets)]))
        out["mean_set_size"] = float(np.mean([len(st) for st in sets]))
    return out


def write_predictions(path: Path, items: list[Item], logits: np.ndarray) -> None:
    s = summarize(logits)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for i, it in enumerate(items):
            k = len(it.choices)
            f.write(
                json.dumps(
                    {
                        "id": it.id,
                        "label": it.label,
                        "answer_index": int(s["answer_index"][i]),
                        "probabilities": s["probabilities"][i, :k].round(6).tolist(),
                        "confidence": float(s["confidence"][i]),
                        "entropy": float(s["entropy"][i]),
                        "epistemic": float(s["epistemic"][i]),
                    }
                )
                + "\n"
            )
    os.replace(tmp, path)


def plot_reliability(path: Path, probs: np.ndarray, labels: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .calibration import N_BINS, bin_counts

    conf = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(float)
    n, c, a = bin_counts(conf, correct)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    centers = (np.arange(N_BINS) + 0.5) / N_BINS
    with np.errstate(invalid="ignore"):
        ax1.bar(
            centers,
            np.where(n > 0, a / np.maximum(n, 1), 0),
            width=1 / N_BINS,
            edgecolor="k",
            label="accuracy",
        )
    ax1.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax1.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability: {title}")
    ax1.legend()
    cov, risk = risk_coverage(conf, correct)
    ax2.plot(cov, risk)
    ax2.set(xlabel="coverage", ylabel="selective error", title="Risk–coverage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
