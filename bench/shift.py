"""Abstention under shift: does the certified policy hold when traffic mixes in items unlike the calibration split?

    python -m bench.shift [--stage score|analyse|all] [--methods lora dalorra ensemble] [--seeds 0 1]
        [--shift-items 200] [--calib-items 400] [--target-error 0.2] [--delta 0.1] [--alpha-u 0.05]

Adapters: the paper-regime ARC-Easy adapters of bench/calibration.py (runs/bench-paper/arc_easy/<method>-s<seed>,
120 steps x 8 over the first 200 items of the training part at lr 1e-3), trained here when missing with the same
budget (bench.budget), so both scripts share them.

Items (read from ../shared/datasets; logits cached beside each adapter by bench.ood.CachedScorer, so the run is
resumable at the granularity of one item set):
  calibration   the trainer's held-out 10 % of ARC-Easy train plus the next unused items of the training part
                (never trained on) up to --calib-items; split by a seeded permutation into a temperature part
                (one third) and a decision part (thresholds, conformal scores), as `dalorra train` does
  test          ARC-Easy validation, all 570 items (K = 4; 4 items have 3 or 5 choices)
  shifted       WinoGrande dev (task shift, K = 2), BoolQ validation (task shift, K = 2), MMLU 4-choice science
                subjects (domain shift, K = 4, --shift-items split evenly over five subjects), ARC-Easy test items
                cut to 2 choices (a benign shift of format: easier, K = 2), ARC-Challenge validation (harder
                questions of the same task, K = 4); the first --shift-items of each

Stage `score` is the heavy part (training, scoring); every unit of it (one adapter's training, one item set's
scoring) holds --lock while it runs, so other heavy jobs on the machine interleave. Stage `analyse` is cheap:
fit each method's policy on its calibration logits (adapters.decision.fit_policy) and measure mixed traffic,
false alarms and coverage on whatever logits exist. Writes bench/results/shift.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path


from bench.budget import REGIMES, SPLITS, add_budget_args, budget_config, capped_train, method_knobs

ID_DATASET = "arc_easy"
TEST = "arc_easy/validation"
MMLU = [
    "mmlu_high_school_physics/test",
    "mmlu_conceptual_physics/test",
    "mmlu_high_school_chemistry/test",
    "mmlu_college_physics/test",
    "mmlu_college_chemistry/test",
]
SHIFTED = {  # name → (files, kind of shift), in scoring order
    "winogrande": (["winogrande/dev"], "task"),
    "mmlu": (MMLU, "domain"),
    "boolq": (["boolq/validation"], "task"),
    "arc_easy_2choice": (["arc_easy/test"], "format (benign): K = 2"),
    "arc_challenge": (["arc_challenge/validation"], "harder questions, same task"),
}
TRAIN_ITEMS = REGIMES["paper"]["train_items"]


@contextlib.contextmanager
def heavy_lock(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (the machine's shared lock for heavy jobs) for one unit of work."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def calibration_items(seed: int, n: int) -> list:
    """The trainer's held-out split of ARC-Easy train, then unused items of its training part (after the first
    TRAIN_ITEMS the paper-regime adapters train on), n in all. Seed-specific, like the adapters."""
    from adapters.train import TrainConfig, load_splits

    rest, _, held = load_splits(TrainConfig(out="", train=SPLITS[ID_DATASET][0], seed=seed))
    extra = rest[TRAIN_ITEMS:]
    return (held + extra)[:n]


def shifted_items(name: str, limit: int) -> list:
    from adapters.data import load_jsonl

    files = SHIFTED[name][0]
    per = -(-limit // len(files))  # ceil: even split over the files (MMLU subjects)
    items = [it for f in files for it in load_jsonl(f, limit=per)]
    if name == "arc_easy_2choice":
        items = [two_choice(it) for it in items]
    return items[:limit]


def two_choice(it):
    """A benign shift: an ARC-Easy *test* item (a split nothing here trains or calibrates on) cut to its gold
    choice and the one after it, in their original order. Same task, easier, but K = 2 moves every normalised
    score, so unfamiliarity flags it while confidence still ranks its answers."""
    from dataclasses import replace

    k = len(it.choices)
    keep = sorted({it.label, (it.label + 1) % k})
    return replace(it, choices=tuple(it.choices[i] for i in keep), label=keep.index(it.label))


def item_sets(seed: int, a: argparse.Namespace) -> Iterator[tuple[str, list]]:
    """(cache name, items) in scoring order: what the analysis needs first comes first."""
    from adapters.data import load_jsonl

    yield f"shift-calib-n{a.calib_items}", calibration_items(seed, a.calib_items)
    yield "shift-test-all", load_jsonl(TEST)
    for name in SHIFTED:
        yield f"shift-{name}-n{a.shift_items}", shifted_items(name, a.shift_items)


def adapter_dir(method: str, seed: int) -> Path:
    return REGIMES["paper"]["root"] / ID_DATASET / f"{method}-s{seed}"


def score_stage(a: argparse.Namespace) -> None:
    """Train each missing adapter (paper regime, bench.calibration's budget), then score every item set."""
    from adapters.train import run
    from bench.calibration import _reuse_lora_as_member0
    from bench.ood import CachedScorer

    root = REGIMES["paper"]["root"] / ID_DATASET
    for seed in a.seeds:
        for method in a.methods:
            out = adapter_dir(method, seed)
            if not (out / "dalorra.json").is_file():
                with heavy_lock(a.lock):
                    t0 = time.time()
                    data = capped_train(ID_DATASET, seed, TRAIN_ITEMS, root)
                    if method == "ensemble":
                        _reuse_lora_as_member0(out, adapter_dir("lora", seed))
                    cfg = budget_config(
                        a, out, data["train"], seed, **method_knobs(method), calibration=data["calibration"]
                    )
                    run(cfg, resume=True)
                    print(f"trained {out} in {time.time() - t0:.0f} s", flush=True)
            scorer = CachedScorer(out, a.samples)
            for name, items in item_sets(seed, a):
                if scorer.path(name).is_file():
                    continue
                with heavy_lock(a.lock):
                    t0 = time.time()
                    scorer(name, items)
                    print(f"scored {out} {name}: {len(items)} items in {time.time() - t0:.0f} s", flush=True)
            scorer.release()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["score", "analyse", "all"], default="all")
    ap.add_argument("--methods", nargs="+", default=["lora", "dalorra", "ensemble"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--shift-items", type=int, default=200, help="items per shifted set")
    ap.add_argument("--calib-items", type=int, default=400, help="calibration items (in-distribution)")
    ap.add_argument("--target-error", type=float, default=0.2)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--alpha-u", type=float, default=0.05)
    ap.add_argument("--lock", default="/tmp/dalorra-heavy.lock", help="flock held per unit of heavy work")
    add_budget_args(ap)
    a = ap.parse_args()
    if a.lr is None:
        a.lr = REGIMES["paper"]["lr"]
    if a.stage in ("score", "all"):
        score_stage(a)
    if a.stage in ("analyse", "all"):
        from bench.shift_report import analyse

        analyse(a)


if __name__ == "__main__":
    main()
