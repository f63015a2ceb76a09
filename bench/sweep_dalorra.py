"""DALorRA hyper-parameter sweep on a held-out split of the *training* data (issue: Trainer, "if a target is missed").

    python -m bench.sweep_dalorra [--dataset arc_easy] [--variants base p0=0.9 ...] [--steps 120] [--eval-limit 150]
        [--lr 1e-3]         (A/B learning rate of every variant; rows are keyed by it)
        [--train-items N]   (train on only the first N items of the training part: several epochs in the same
                             steps, the over-fitting regime where fine-tuned models grow over-confident)

Every variant changes one knob of the calibration benchmark's DALorRA setting (p0, τ, KL warm-up, φ learning rate)
and keeps everything else: data, steps, batch, seed, LoRA learning rate. Training uses the trainer's seeded split of
the train file; the held-out part (the split `dalorra train` uses for decision calibration) is the sweep's test set,
so the validation sets used as test in bench/calibration.py are never looked at. A plain LoRA run on the same split
is the reference for the ECE ratio ("lora_lr=1e-3" asks whether plain LoRA learns more at a higher learning
rate: the budget search for datasets where it stays near chance). Resumable per variant; adapters go to runs/sweep/. Writes
bench/results/dalorra_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from adapters.train import load_splits
from bench.budget import (
    DEFAULT_LR,
    METRICS,
    SPLITS,
    add_budget_args,
    budget_config,
    capped_train,
    train_and_score,
)
from bench.common import RESULTS, command, write

# One knob at a time, from the benchmark's DALorRA setting (p0 0.5, τ 2/3, no KL warm-up, φ lr 0.05 constant).
VARIANTS = {
    "lora": {"method": "lora"},
    "base": {},
    "p0=0.9": {"p0": 0.9},
    "lr_mask=0.2": {"lr_mask": 0.2},
    "kl_warmup=0.5": {"kl_warmup": 0.5},
    "tau=1.0": {"tau": 1.0},
    "p0=0.2": {"p0": 0.2},
    "lr_mask=0.01": {"lr_mask": 0.01},
    "tau=0.3": {"tau": 0.3},
    "lora_lr=1e-3": {"method": "lora", "lr": 1e-3},
    # levers that may widen the posterior (issue: Uncertainty that carries information)
    "sharing=rank": {"mask_sharing": "rank"},
    "sharing=layer": {"mask_sharing": "layer"},
    "train_samples=2": {"train_samples": 2},
    "train_samples=4": {"train_samples": 4},
    "r=16": {"r": 16, "alpha": 32.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="arc_easy", choices=list(SPLITS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_budget_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--train-items",
        type=int,
        default=None,
        help="train on the first N items of the training part only (held-out split unchanged)",
    )
    a = ap.parse_args()
    if a.lr is None:
        a.lr = DEFAULT_LR
    out_json = RESULTS / "dalorra_sweep.json"
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    done = {
        (r["variant"], r["dataset"], r["seed"], r.get("train_items"), r.get("lr", DEFAULT_LR)) for r in rows
    }
    setting = {
        "held_out": "10% seeded split of train (the trainer's calibration split)",
        "steps": a.steps,
        "batch_size": a.batch_size,
        "lr": "per row (A/B lr column)",
        "lr_mask": a.lr_mask,
        "p0": 0.5,
        "tau": 2 / 3,
        "kl_warmup": 0.0,
        "mask_schedule": "constant",
        "samples": a.samples,
        "eval_limit": a.eval_limit,
        "max_length": a.max_length,
        "seed": "per row",
    }
    for name in a.variants:
        if (name, a.dataset, a.seed, a.train_items, a.lr) in done:
            continue
        data = (
            capped_train(a.dataset, a.seed, a.train_items, Path("runs/sweep") / a.dataset)
            if a.train_items
            else {"train": SPLITS[a.dataset][0]}
        )
        tag = (f"-n{a.train_items}" if a.train_items else "") + (f"-lr{a.lr:g}" if a.lr != DEFAULT_LR else "")
        out = Path("runs/sweep") / a.dataset / f"{name}{tag}-s{a.seed}"
        cfg = budget_config(
            a, out, data.pop("train"), a.seed, **{"method": "dalorra", **data, **VARIANTS[name]}
        )
        held_out = load_splits(cfg)[2][: a.eval_limit]
        t0 = time.perf_counter()
        rec, model, _, m, _ = train_and_score(
            cfg, held_out, np.array([it.label for it in held_out]), a.samples
        )
        keep = model.keep_probabilities() if cfg.method == "dalorra" else {}
        row = {
            "variant": name,
            "dataset": a.dataset,
            "seed": a.seed,
            "train_items": a.train_items,
            "lr": a.lr,
            "knobs": VARIANTS[name],
            "command": command(),
            **{k: m[k] for k in METRICS},
            "chance": float(np.mean([1 / len(it.choices) for it in held_out])),
            "keep_probability": {k: float(np.mean(v)) for k, v in keep.items()},
            "seconds_per_step": rec["training"]["seconds_per_step"],
            "wall_seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(rows, setting)
    _write(rows, setting)


def _write(rows: list[dict], setting: dict) -> None:
    table = [
        f"Setting (every variant changes only its knob): {json.dumps(setting)}",
        "",
        "| dataset | train items | A/B lr | seed | variant | acc | ECE | ECE / LoRA's | conf − acc | NLL | Brier | mean MI | "
        "mean keep-prob |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["dataset"], r.get("train_items") or 0, r.get("lr", DEFAULT_LR), r["seed"])  # noqa: E731
    ref = {key(r): r for r in rows if r["variant"] == "lora"}
    for r in sorted(rows, key=lambda r: (*key(r), list(VARIANTS).index(r["variant"]))):
        lo = ref.get(key(r))
        ratio = f"{r['ece'] / lo['ece']:.2f}" if lo and lo["ece"] > 0 else "–"
        keep = f"{np.mean(list(r['keep_probability'].values())):.2f}" if r["keep_probability"] else "–"
        gap = f"{r['mean_confidence'] - r['acc']:+.3f}" if "mean_confidence" in r else "–"
        lr = r["knobs"].get("lr", r.get("lr", DEFAULT_LR))
        table.append(
            f"| {r['dataset']} | {r.get('train_items') or 'all'} | {lr:g} | {r['seed']} | {r['variant']} | "
            f"{r['acc']:.3f} | {r['ece']:.3f} | {ratio} | {gap} | {r['nll']:.3f} | {r['brier']:.3f} | "
            f"{r['mean_epistemic']:.5f} | {keep} |"
        )
    n = rows[0]["n"] if rows else 0
    table += [
        "",
        f"Held-out split: the first {n} items of a 10% seeded split of each training file (chance: 1/K). "
        '"train items" N < all: trained on only the first N items of the rest, for the same steps (several '
        f"epochs). conf − acc: mean top probability minus accuracy (> 0 over-confident). Each row's own "
        f"command is in the JSON. A seed s trains with seed s and holds out split s; with one seed and {n} "
        "items ECE differences of a few points "
        "can be noise; treat a variant as better only if it wins on accuracy, ECE and NLL together.",
    ]
    write("dalorra_sweep", {"setting": setting, "rows": rows}, "\n".join(table))


if __name__ == "__main__":
    main()
