"""Training cost per step, side by side: DALorRA vs plain LoRA (and the other methods), interleaved rounds.

    python -m bench.train_step [--methods lora dalorra map mcdropout] [--steps 8] [--rounds 3] [--dataset arc_easy/train]

The calibration benchmark's s/step column is taken whenever each run happened, so other jobs on the 2 cores
blur it. Here every round trains each method for --steps steps on the same batches (same seed, the benchmark's
budget otherwise), one method after the other, and the median over rounds is compared: load changes hit every
method alike. Model loading and checkpoint writes are outside the timed steps. Writes
bench/results/train_step.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from adapters.train import train_one
from bench.budget import add_budget_args, budget_config
from bench.common import write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["lora", "dalorra", "map", "mcdropout"],
        choices=["lora", "dalorra", "map", "mcdropout"],
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dataset", default="arc_easy/train")
    add_budget_args(ap)  # the calibration benchmark's budget, but few steps per round
    ap.set_defaults(steps=8)
    a = ap.parse_args()
    per: dict[str, list[float]] = {m: [] for m in a.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for method in a.methods:
                cfg = budget_config(a, Path(tmp) / method, a.dataset, 0, method=method, save_every=10**9)
                _, summary = train_one(cfg, 0, Path(tmp) / f"{method}-{rnd}.pt", resume=False)
                per[method].append(summary["seconds_per_step"])
                print(f"round {rnd} {method}: {summary['seconds_per_step']:.2f} s/step", flush=True)
    med = {m: statistics.median(v) for m, v in per.items()}
    ref = med.get("lora")
    rows = [
        {
            "method": m,
            "seconds_per_step_median": med[m],
            "per_round": per[m],
            "vs_lora": med[m] / ref if ref else None,
        }
        for m in a.methods
    ]
    table = [
        f"{a.steps} steps of batch {a.batch_size} ({a.dataset}, cloze, r 8 on q/v/lm_head, max length "
        f"{a.max_length}) per method per round, {a.rounds} interleaved rounds; median s/step.",
        "",
        "| method | s/step (median) | per round | × LoRA |",
        "|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['vs_lora']:.2f}" if r["vs_lora"] else "–"
        table.append(
            f"| {r['method']} | {r['seconds_per_step_median']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in r['per_round'])} | {ratio} |"
        )
    write(
        "train_step",
        {
            "rows": rows,
            "steps": a.steps,
            "rounds": a.rounds,
            "dataset": a.dataset,
            "batch_size": a.batch_size,
            "seed": 0,
        },
        "\n".join(table),
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()
