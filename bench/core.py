"""Core measurements (issue: Core): zero-shot ACC/ECE per scoring mode, model load time, score() latency.

    python -m bench.core [--n 400] [--reps 5]
Writes bench/results/core.json and core.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from adapters.basemodel import load_base
from adapters.config import AdapterConfig, PromptFormat
from adapters.data import load_jsonl
from adapters.evaluate import evaluate_logits, predict_logits
from adapters.model import DalorraModel
from adapters.scoring import score
from bench.common import write


def load_times() -> dict:
    """First load (GGUF → float conversion, in an empty cache) and a cached load, each in a fresh process."""
    code = (
        "import time; t=time.perf_counter(); from adapters.basemodel import load_base; load_base(); "
        "print(time.perf_counter()-t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "DALORRA_CACHE": cache}
        first = float(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        cached = float(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
    return {"first_load_with_conversion_s": first, "cached_load_s": cached}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="ARC-Easy validation items for zero-shot accuracy")
    ap.add_argument("--reps", type=int, default=5, help="repetitions for latency medians")
    a = ap.parse_args()
    items = load_jsonl("arc_easy/validation", limit=a.n)
    labels = np.array([it.label for it in items])
    data = {"load": load_times(), "zero_shot": {}, "score_latency": []}
    for mode in ("letter", "cloze"):
        base, tok = load_base()
        model = DalorraModel(base, tok, AdapterConfig(), PromptFormat(mode=mode))
        model.set_mask_mode("off")
        t0 = time.perf_counter()
        m = evaluate_logits(predict_logits(model, items, samples=1, batch_size=16), labels)
        data["zero_shot"][mode] = {
            "acc": m["acc"],
            "ece": m["ece"],
            "nll": m["nll"],
            "n": a.n,
            "seconds": time.perf_counter() - t0,
        }
        print(mode, data["zero_shot"][mode], flush=True)
        # Latency of score() with a DALorRA adapter (random B so masks matter), 8 questions.
        torch.manual_seed(0)
        with torch.no_grad():
            for layer in model.adapted.values():
                layer.lora_B.normal_(0, 0.01)
        model.set_mask_mode("all")
        eight = items[:8]
        for S in (1, 10):
            for batched in (True, False):
                score(model, eight, samples=S, batched=batched)  # warm-up
                ts = []
                for _ in range(a.reps):
                    t = time.perf_counter()
                    score(model, eight, samples=S, batched=batched)
                    ts.append(time.perf_counter() - t)
                row = {
                    "mode": mode,
                    "S": S,
                    "path": "one batched forward" if batched else "S separate forwards",
                    "median_s": statistics.median(ts),
                    "reps": a.reps,
                }
                data["score_latency"].append(row)
                print(row, flush=True)
    L = data["load"]
    table = [
        f"## Zero-shot (no adapter), first {a.n} ARC-Easy validation questions\n",
        "| mode | acc | ece | nll |",
        "|---|---|---|---|",
    ]
    for mode, m in data["zero_shot"].items():
        table.append(f"| {mode} | {m['acc']:.3f} | {m['ece']:.3f} | {m['nll']:.3f} |")
    table += [
        "",
        "Chance is about 0.25 (4 choices).",
        "",
        f"## Load time\n\nfirst load with GGUF conversion: {L['first_load_with_conversion_s']:.1f} s; "
        f"cached: {L['cached_load_s']:.1f} s\n",
        f"## score() latency, 8 questions (median of {a.reps})\n",
        "| mode | S | path | median s |",
        "|---|---|---|---|",
    ]
    for r in data["score_latency"]:
        table.append(f"| {r['mode']} | {r['S']} | {r['path']} | {r['median_s']:.3f} |")
    write("core", data, "\n".join(table))


if __name__ == "__main__":
    main()
