"""The shared budget of the side-by-side benchmarks (bench.calibration, bench.sweep_dalorra, bench.ood,
bench.train_step): datasets and their splits, the regimes, the training config every method shares, and scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from adapters.adapter_io import load_adapter
from adapters.basemodel import load_base
from adapters.calibration import auroc
from adapters.data import Item
from adapters.evaluate import evaluate_logits, predict_logits
from adapters.train import TrainConfig, load_splits, run
from adapters.uncertainty import summarize

SPLITS = {
    "arc_easy": ("arc_easy/train", "arc_easy/validation"),
    "arc_challenge": ("arc_challenge/train", "arc_challenge/validation"),
    "openbookqa": ("openbookqa/train", "openbookqa/dev"),
    "winogrande_s": ("winogrande/train_s", "winogrande/dev"),
}
DEFAULT_LR = 3e-4  # A/B learning rate of the benchmark budget (short regime)
REGIMES = {  # A/B lr, training items (None: the whole training part), root of the runs
    "short": {"lr": DEFAULT_LR, "train_items": None, "root": Path("runs/bench")},
    "paper": {"lr": 1e-3, "train_items": 200, "root": Path("runs/bench-paper")},
}
METRICS = ("acc", "ece", "nll", "brier", "aurc", "mean_confidence", "mean_entropy", "mean_epistemic", "n")


def score_logits(logits: np.ndarray, labels: np.ndarray) -> dict:
    """The row metrics of (S, B, K) logits: METRICS plus the wrong-answer AUROCs."""
    m = evaluate_logits(logits, labels)
    return {**{k: m[k] for k in METRICS}, **wrong_answer_aurocs(logits, labels)}


def wrong_answer_aurocs(logits: np.ndarray, labels: np.ndarray) -> dict:
    """How well each uncertainty signal ranks wrong answers above right ones (0.5: no information)."""
    s = summarize(logits)
    wrong = s["answer_index"] != labels
    return {
        "auroc_confidence": auroc(-s["confidence"], wrong),
        "auroc_entropy": auroc(s["entropy"], wrong),
        "auroc_mi": auroc(s["epistemic"], wrong),
    }


def save_logits(out: Path, name: str, logits: np.ndarray) -> None:
    tmp = Path(out).with_name(f".{Path(out).name}-{name}.npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, logits)
    os.replace(tmp, Path(str(out) + f".{name}_logits.npy"))


def capped_train(dataset: str, seed: int, n: int, root: Path) -> dict:
    """Training file = the first n items of the trainer's training part, calibration file = its usual held-out
    split of the full training file (written under `root`, never into the repository), so every method of one
    dataset and seed trains on the same items and is calibrated on the same held-out ones."""
    rest, _, held = load_splits(
        TrainConfig(out="", train=SPLITS[dataset][0], seed=seed)
    )  # the trainer's own split
    root.mkdir(parents=True, exist_ok=True)
    paths = {"train": root / f"train-first{n}-s{seed}.jsonl", "calibration": root / f"held-out-s{seed}.jsonl"}
    for key, items in (("train", rest[:n]), ("calibration", held)):
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(item_row(it)) + "\n" for it in items))
        os.replace(tmp, paths[key])
    return {k: str(v) for k, v in paths.items()}


def item_row(it: Item) -> dict:
    row = {"id": it.id, "question": it.question, "choices": list(it.choices), "label": it.label}
    return {**row, "context": it.context} if it.context is not None else row


def add_budget_args(ap: argparse.ArgumentParser) -> None:
    """The training and evaluation budget shared by every side-by-side comparison (this file, sweep_dalorra.py)."""
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="A/B learning rate (default: the regime's)")
    ap.add_argument("--lr-mask", type=float, default=0.05)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--eval-limit", type=int, default=150)
    ap.add_argument("--max-length", type=int, default=160)


def method_knobs(method: str) -> dict:
    """ "lora" → {method: lora}; "dalorra@top8" → also top_layers 8; "dalorra@p0=0.9" → also p0 0.9."""
    base, _, spec = method.partition("@")
    if not spec:
        return {"method": base}
    if spec.startswith("top") and spec[3:].isdigit():
        return {"method": base, "top_layers": int(spec[3:])}
    key, eq, value = spec.partition("=")
    if not eq or key not in TrainConfig.__dataclass_fields__:
        raise SystemExit(
            f"method {method!r}: expected METHOD, METHOD@topL or METHOD@KNOB=VALUE (a TrainConfig field)"
        )
    try:
        v: object = int(value) if key == "r" else float(value)
    except ValueError:
        v = value  # a string knob, e.g. mask_sharing=rank
    return {"method": base, key: v}


def budget_config(a: argparse.Namespace, out: Path, train: str, seed: int, **knobs) -> TrainConfig:
    """A TrainConfig at the shared budget; `knobs` (method, p0, lr_mask, ...) override it."""
    return TrainConfig(
        **{
            "out": str(out),
            "train": train,
            "steps": a.steps,
            "batch_size": a.batch_size,
            "lr": a.lr,
            "lr_mask": a.lr_mask,
            "mask_schedule": "constant",
            "max_length": a.max_length,
            "seed": seed,
            "eval_samples": a.samples,
            "calibrate": False,
            "temperature_scaling": False,
            "save_every": 25,
            "progress": False,
            **knobs,
        }
    )


def train_and_score(cfg: TrainConfig, items, labels: np.ndarray, samples: int):
    """Train (resuming), reload the written adapter, score `items` at S = samples with seed 0.

    Returns (record, model, logits, metrics, eval seconds)."""
    rec = run(cfg, resume=True)
    return (rec, *score_adapter(cfg.out, items, labels, samples))


def score_adapter(out: str | Path, items, labels: np.ndarray, samples: int):
    """Load the adapter at `out` onto a fresh base (loading wraps its Linear layers in place) and score `items` at
    S = samples with seed 0. Returns (model, logits, metrics, eval seconds)."""
    base, tok = load_base(None)
    model = load_adapter(out, base, tok)
    t_eval = time.perf_counter()
    logits = predict_logits(model, items, samples, seed=0, progress=False)
    t_eval = time.perf_counter() - t_eval
    return model, logits, evaluate_logits(logits, labels), t_eval
