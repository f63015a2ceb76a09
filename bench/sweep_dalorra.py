"""DALorRA hyper-parameter sweep on a held-out split of the *training* data (issue: Trainer, "if a target is missed").

    python bench/sweep_dalorra.py [--dataset arc_easy] [--variants base p0=0.9 ...] [--steps 120] [--eval-limit 150]

Every variant changes one knob of the calibration benchmark's DALorRA setting (p0, τ, KL warm-up, φ learning rate)
and keeps everything else: data, steps, batch, seed, LoRA learning rate. Training uses the trainer's seeded split of
the train file; the held-out part (the split `dalorra train` uses for decision calibration) is the sweep's test set,
so the validation sets used as test in bench/calibration.py are never looked at. A plain LoRA run on the same split
is the reference for the ECE ratio. Resumable per variant; adapters go to runs/sweep/. Writes
bench/results/dalorra_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adapters.train import load_splits  # noqa: E402
from bench.calibration import SPLITS, add_budget_args, budget_config, train_and_score  # noqa: E402
from bench.common import RESULTS, write  # noqa: E402

# One knob at a time, from the benchmark's DALorRA setting (p0 0.5, τ 2/3, no KL warm-up, φ lr 0.05 constant).
VARIANTS = {"lora": {"method": "lora"}, "base": {},
            "p0=0.9": {"p0": 0.9}, "lr_mask=0.2": {"lr_mask": 0.2}, "kl_warmup=0.5": {"kl_warmup": 0.5},
            "tau=1.0": {"tau": 1.0}, "p0=0.2": {"p0": 0.2}, "lr_mask=0.01": {"lr_mask": 0.01},
            "tau=0.3": {"tau": 0.3}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="arc_easy", choices=list(SPLITS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_budget_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out_json = RESULTS / "dalorra_sweep.json"
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    done = {(r["variant"], r["dataset"], r["seed"]) for r in rows}
    setting = {"dataset": a.dataset, "train": SPLITS[a.dataset][0], "held_out": "10% seeded split of train "
               "(the trainer's calibration split)", "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
               "lr_mask": a.lr_mask, "p0": 0.5, "tau": 2 / 3, "kl_warmup": 0.0, "mask_schedule": "constant",
               "samples": a.samples, "eval_limit": a.eval_limit, "max_length": a.max_length, "seed": a.seed}
    for name in a.variants:
        if (name, a.dataset, a.seed) in done:
            continue
        cfg = budget_config(a, Path("runs/sweep") / a.dataset / f"{name}-s{a.seed}", SPLITS[a.dataset][0], a.seed,
                            **{"method": "dalorra", **VARIANTS[name]})
        held_out = load_splits(cfg)[2][:a.eval_limit]
        t0 = time.perf_counter()
        rec, model, _, m, _ = train_and_score(cfg, held_out, np.array([it.label for it in held_out]), a.samples)
        keep = model.keep_probabilities() if cfg.method == "dalorra" else {}
        row = {"variant": name, "dataset": a.dataset, "seed": a.seed, "knobs": VARIANTS[name],
               **{k: m[k] for k in ("acc", "ece", "nll", "brier", "aurc", "mean_entropy", "mean_epistemic", "n")},
               "chance": float(np.mean([1 / len(it.choices) for it in held_out])),
               "keep_probability": {k: float(np.mean(v)) for k, v in keep.items()},
               "seconds_per_step": rec["training"]["seconds_per_step"], "wall_seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(rows, setting)
    _write(rows, setting)


def _write(rows: list[dict], setting: dict) -> None:
    table = [f"Setting (every variant changes only its knob): {json.dumps(setting)}", "",
             "| dataset | seed | variant | acc | ECE | ECE / LoRA's | NLL | Brier | mean MI | mean keep-prob |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["dataset"], r["seed"]): r for r in rows if r["variant"] == "lora"}
    for r in sorted(rows, key=lambda r: (r["dataset"], r["seed"], list(VARIANTS).index(r["variant"]))):
        lo = ref.get((r["dataset"], r["seed"]))
        ratio = f"{r['ece'] / lo['ece']:.2f}" if lo and lo["ece"] > 0 else "–"
        keep = f"{np.mean(list(r['keep_probability'].values())):.2f}" if r["keep_probability"] else "–"
        table.append(f"| {r['dataset']} | {r['seed']} | {r['variant']} | {r['acc']:.3f} | {r['ece']:.3f} | {ratio} | "
                     f"{r['nll']:.3f} | {r['brier']:.3f} | {r['mean_epistemic']:.5f} | {keep} |")
    table += ["", f"Held-out split: {rows[0]['n'] if rows else 0} items from the training file; chance "
              f"{rows[0]['chance'] if rows else 0:.2f}. One seed and 150 items: ECE differences of a few points "
              "can be noise; treat a variant as better only if it wins on accuracy, ECE and NLL together."]
    write("dalorra_sweep", {"setting": setting, "rows": rows}, "\n".join(table))


if __name__ == "__main__":
    main()
