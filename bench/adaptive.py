"""Adaptive sampling on ARC-Easy validation: mean S used and decisions that differ from full S (issue: Efficiency).

    python -m bench.adaptive [--adapter adapters/default/arc-easy-dalorra] [--limit 570] [--samples 10]
Scores every question once at S draws (the server's fixed seed), then replays the server's rounds
(first `adaptive_first` draws, then `adaptive_step` more) on prefixes of those same draws: mask draws are
prefix-consistent, so this is exactly what the server answers (tests/test_server.py checks that).
A decision is (answer index, answer/abstain) under the adapter's fitted thresholds.
Logits are cached in runs/adaptive/ so a cut-off run resumes. Writes bench/results/adaptive.{json,md}.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from adapters.data import load_jsonl
from adapters.decision import FIXED_SEED, DecisionPolicy, adaptive_rounds
from adapters.uncertainty import sampling_settled, summarize
from bench.common import write
from server.settings import REPO, Settings


def decisions(logits: np.ndarray, policy: DecisionPolicy) -> tuple[int, bool]:
    s = summarize(logits[:, None, :])
    return int(s["answer_index"][0]), policy.reasons(s)[0] is not None


def replay(full: np.ndarray, cfg: Settings, policy: DecisionPolicy) -> int:
    """Samples the server's adaptive rounds would use for this item's (S, K) logits."""
    n = 0
    for size in adaptive_rounds(len(full), cfg.adaptive_first, cfg.adaptive_step):
        n += size
        if sampling_settled(
            full[:n], policy.min_confidence, policy.max_epistemic, cfg.adaptive_tolerance, cfg.adaptive_z
        ):
            break
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default=str(REPO / "adapters" / "default" / "arc-easy-dalorra"))
    ap.add_argument("--data", default="arc_easy/validation")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=8)
    a = ap.parse_args()
    import torch

    from adapters.adapter_io import load_adapter
    from adapters.basemodel import load_base
    from adapters.scoring import encode, score

    items = load_jsonl(a.data, limit=a.limit)
    base, tok = load_base(None)
    model = load_adapter(a.adapter, base, tok)
    cache = Path("runs/adaptive") / f"{Path(a.adapter).name}-S{a.samples}"
    cache.mkdir(parents=True, exist_ok=True)
    enc = encode(items, tok, model.fmt)
    logits = []
    for i in range(0, len(items), a.chunk):
        f = cache / f"{i:05d}-{a.chunk}.npy"
        if not f.is_file():
            with torch.no_grad():
                lg = score(
                    model,
                    items[i : i + a.chunk],
                    samples=a.samples,
                    seed=FIXED_SEED,
                    encoded=enc[i : i + a.chunk],
                )
            np.save(f.with_suffix(".tmp.npy"), lg)
            os.replace(f.with_suffix(".tmp.npy"), f)
            print(f"scored {min(i + a.chunk, len(items))}/{len(items)}", flush=True)
        lg = np.load(f)
        logits += [lg[:, b, : len(items[i + b].choices)] for b in range(lg.shape[1])]
    cfg = Settings()
    rec = model.record
    T = float(rec.get("temperature", 1.0))  # the server divides every mask's logits by it
    policy = DecisionPolicy.from_record(rec.get("decision"))
    conf_t, epi_t = policy.min_confidence, policy.max_epistemic
    used, differ, answer_differ = [], 0, 0
    for full in logits:
        full = full / T
        n = replay(full, cfg, policy)
        used.append(n)
        d_full, d_ad = decisions(full, policy), decisions(full[:n], policy)
        differ += d_full != d_ad
        answer_differ += d_full[0] != d_ad[0]
    used = np.array(used)
    N = len(logits)
    hist = {int(k): int((used == k).sum()) for k in np.unique(used)}
    res = {
        "adapter": a.adapter,
        "dataset": a.data,
        "items": N,
        "max_samples": a.samples,
        "seed": FIXED_SEED,
        "rule": {
            "first": cfg.adaptive_first,
            "step": cfg.adaptive_step,
            "tolerance": cfg.adaptive_tolerance,
            "z": cfg.adaptive_z,
            "min_confidence": conf_t,
            "max_epistemic": epi_t,
        },
        "mean_samples": float(used.mean()),
        "samples_histogram": hist,
        "decision_agreement": 1 - differ / N,
        "answer_agreement": 1 - answer_differ / N,
        "decisions_differing": int(differ),
        "cost_vs_full": float(used.mean() / a.samples),
    }
    table = "\n".join(
        [
            f"Adapter `{a.adapter}` on {N} {a.data} questions; full S = {a.samples}; rule: first {cfg.adaptive_first} "
            f"draws, then +{cfg.adaptive_step}, stop when `sampling_settled` (tolerance {cfg.adaptive_tolerance}, "
            f"z = {cfg.adaptive_z}, confidence threshold {conf_t}, MI threshold {epi_t}).",
            "",
            "| mean S used | S histogram | decisions = full S | answers = full S | cost vs full S |",
            "|---|---|---|---|---|",
            f"| {used.mean():.2f} | {hist} | {1 - differ / N:.4f} ({differ} differ) | {1 - answer_differ / N:.4f} | "
            f"{used.mean() / a.samples:.2f} |",
        ]
    )
    write("adaptive", res, table)
    print(table)


if __name__ == "__main__":
    main()
