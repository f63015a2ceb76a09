"""Calibration benchmark: every method with an identical budget, side by side (issues: Trainer; Uncertainty).

    python -m bench.calibration [--regime short|paper] [--datasets arc_easy ...]
        [--methods dalorra lora map mcdropout ensemble]
        (a method "dalorra@top8" trains DALorRA on the top 8 decoder layers only, "dalorra@p0=0.9" or
         "dalorra@mask_sharing=rank" with one knob changed, same budget otherwise)
        [--seeds 0 1] [--steps 120] [--eval-limit 150]

Two regimes, both rows of one table (field `regime`):
  short  120 steps x 8 over the whole training file at lr 3e-4 (under one epoch of ARC-Easy): MLE-LoRA is
         hardly over-confident there.
  paper  the same 120 steps x 8 over the first 200 items of the training part (4.8 epochs) at lr 1e-3, the
         budget found on a held-out part of the training data (bench/results/dalorra_sweep.md) where MLE-LoRA
         learns and grows over-confident, as in the paper's 2-30 epochs.
In the paper regime every adapter is also scored on the first --calib-items items of the held-out split of the
training file (never the test split), one temperature is fitted there by NLL (applied to each mask's logits
before averaging), and a second row "METHOD+ts" reports the same test predictions temperature-scaled: the
cheapest fix a user could apply, the bar to beat. Every row carries the AUROC of confidence, entropy and MI
for telling wrong answers from right ones.

Resumable per (regime, method, dataset, seed): finished rows are kept in bench/results/calibration.json and
skipped; adapters go to runs/bench/ (short) or runs/bench-paper/ (paper), with their test and calibration
logits saved beside them (bench/ood.py reuses them). Writes calibration.json (all rows) and calibration.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from adapters.calibration import fit_temperature
from adapters.data import load_jsonl
from adapters.evaluate import predict_logits
from bench.budget import (
    REGIMES,
    SPLITS,
    add_budget_args,
    budget_config,
    capped_train,
    method_knobs,
    save_logits,
    score_adapter,
    score_logits,
    train_and_score,
    wrong_answer_aurocs,
)
from bench.common import RESULTS, command, mean_std, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--regime", choices=list(REGIMES), default="short")
    ap.add_argument("--datasets", nargs="+", default=list(SPLITS))
    ap.add_argument("--methods", nargs="+", default=["lora", "dalorra", "map", "mcdropout", "ensemble"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--calib-items",
        type=int,
        default=100,
        help="paper regime: held-out training items the temperature is fitted on",
    )
    ap.add_argument(
        "--backfill-confidence",
        action="store_true",
        help="re-score finished rows that lack mean_confidence from their saved adapters (same draws; "
        "fails if any other metric moves) instead of training",
    )
    add_budget_args(ap)
    a = ap.parse_args()
    regime = REGIMES[a.regime]
    if a.lr is None:
        a.lr = regime["lr"]
    out_json = RESULTS / "calibration.json"
    old = json.loads(out_json.read_text()) if out_json.is_file() else {}
    rows = old.get("rows", [])
    for r in rows:
        r.setdefault("regime", "short")
    # every invocation that added rows, oldest first (a row's own is in row["command"] from 2026-11-29 on)
    commands = old.get("commands") or ([old["command"]] if old else [])
    budgets = old.get("budgets") or {"short": old["budget"]} if old else {}
    done = {(r["regime"], r["method"], r["dataset"], r["seed"]) for r in rows}
    budgets[a.regime] = {
        "steps": a.steps,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "lr_mask": a.lr_mask,
        "mask_schedule": "constant",
        "r": 8,
        "alpha": 16,
        "targets": "q_proj,v_proj,lm_head",
        "mode": "cloze",
        "normalize": "tokens",
        "max_length": a.max_length,
        "samples": a.samples,
        "eval_limit": a.eval_limit,
        "train_items": regime["train_items"],
        **({"calib_items": a.calib_items} if a.regime == "paper" else {}),
    }
    if a.backfill_confidence:
        _backfill_confidence(a, rows, budgets, commands)
        return
    for seed in a.seeds:  # every dataset at the first seed before any second seed
        for ds in a.datasets:
            train, test = SPLITS[ds]
            items = load_jsonl(test, limit=a.eval_limit)
            labels = np.array([it.label for it in items])
            root = regime["root"] / ds
            data = (
                {"train": train}
                if regime["train_items"] is None
                else capped_train(ds, seed, regime["train_items"], root)
            )
            for method in a.methods:
                if (a.regime, method, ds, seed) in done:
                    continue
                out = root / f"{method}-s{seed}"
                if method == "ensemble":
                    _reuse_lora_as_member0(out, root / f"lora-s{seed}")
                cfg = budget_config(
                    a,
                    out,
                    data["train"],
                    seed,
                    **method_knobs(method),
                    **({"calibration": data["calibration"]} if "calibration" in data else {}),
                )
                t0 = time.perf_counter()
                rec, model, logits, m, t_eval = train_and_score(cfg, items, labels, a.samples)
                save_logits(out, "test", logits)
                row = {
                    "regime": a.regime,
                    "method": method,
                    "dataset": ds,
                    "seed": seed,
                    "chance": float(np.mean([1 / len(it.choices) for it in items])),
                    **m,
                    **wrong_answer_aurocs(logits, labels),
                    "train_seconds": rec["training"]["train_seconds"],
                    "seconds_per_step": rec["training"]["seconds_per_step"],
                    "keep_probability": {k: float(np.mean(v)) for k, v in model.keep_probabilities().items()},
                    "keep_histogram": rec.get("keep_histogram"),
                    "wall_seconds": time.perf_counter() - t0,
                    "eval_samples": int(logits.shape[0]),
                    "eval_seconds": t_eval,
                }
                new = [row]
                if (
                    a.regime == "paper"
                ):  # the same test predictions, temperature-scaled on held-out train items
                    calib = load_jsonl(data["calibration"], limit=a.calib_items)
                    c_logits = predict_logits(model, calib, a.samples, seed=0, progress=False)
                    save_logits(out, "calib", c_logits)
                    T = fit_temperature(c_logits, np.array([it.label for it in calib]))
                    row["temperature"] = 1.0
                    new.append(
                        {
                            **row,
                            "method": method + "+ts",
                            "temperature": T,
                            **score_logits(logits / T, labels),
                            "keep_histogram": None,
                        }
                    )
                for r in new:
                    rows.append({**r, "command": command()})
                    print(json.dumps({k: v for k, v in r.items() if k != "keep_histogram"}), flush=True)
                _added_rows(commands)
                _write(rows, budgets, commands)
    _write(rows, budgets, commands)


def _backfill_confidence(a: argparse.Namespace, rows: list[dict], budgets: dict, commands: list[str]) -> None:
    """Rows written before mean_confidence was recorded: score the saved adapter again with the same S and seed
    and take mean_confidence; every metric the row already has must come out the same (checked to 1e-6)."""
    tests: dict = {}  # dataset → its validation items, read once
    for r in rows:
        if (
            "mean_confidence" in r
            or r["regime"] != "short"
            or r["dataset"] not in a.datasets
            or r["method"] not in a.methods
            or r["seed"] not in a.seeds
        ):
            continue
        if r["dataset"] not in tests:
            tests[r["dataset"]] = load_jsonl(SPLITS[r["dataset"]][1], limit=a.eval_limit)
        items = tests[r["dataset"]]
        m = score_adapter(
            Path("runs/bench") / r["dataset"] / f"{r['method']}-s{r['seed']}",
            items,
            np.array([it.label for it in items]),
            a.samples,
        )[2]
        moved = {k: (r[k], m[k]) for k in ("acc", "ece", "nll", "brier") if abs(r[k] - m[k]) > 1e-6}
        if moved:
            raise SystemExit(f"{r['dataset']} {r['method']} seed {r['seed']}: re-scoring moved {moved}")
        r["mean_confidence"] = m["mean_confidence"]
        _added_rows(commands)
        print(
            r["dataset"],
            r["method"],
            r["seed"],
            f"conf {m['mean_confidence']:.3f} acc {m['acc']:.3f}",
            flush=True,
        )
        _write(rows, budgets, commands)


def _reuse_lora_as_member0(ensemble_out: Path, lora_out: Path) -> None:
    """Ensemble member 0 trains with the LoRA run's exact config and seed (bit-identical, checked on
    ARC-Easy seed 0), so its finished checkpoint is copied instead of retrained; its t_train comes along."""
    src = lora_out.with_name(lora_out.name + ".ckpt") / "state.pt"
    dst = ensemble_out.with_name(ensemble_out.name + ".ckpt") / "member0.pt"
    if src.is_file() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
        os.replace(dst.with_name(dst.name + ".tmp"), dst)


def _added_rows(commands: list[str]) -> None:
    """This invocation changed rows: list it among the commands behind the table (once)."""
    if command() not in commands:
        commands.append(command())


def _write(rows, budgets, commands) -> None:
    groups: dict = {}
    for r in rows:
        if not r["method"].startswith(
            "dalorra"
        ):  # φ is not trained (masks all on): no keep-probabilities to report
            r["keep_probability"] = r["keep_histogram"] = None
        groups.setdefault((r["regime"], r["dataset"], r["method"]), []).append(r)

    def gap(rs):  # mean confidence − accuracy: > 0 over-confident, < 0 under-confident
        return (
            f"{np.mean([r['mean_confidence'] - r['acc'] for r in rs]):+.3f}"
            if all("mean_confidence" in r for r in rs)
            else "–"
        )

    def au(rs, k):
        return mean_std([r[k] for r in rs]) if all(k in r for r in rs) else "–"

    table = []
    for regime in [g for g in REGIMES if any(k[0] == g for k in groups)]:
        table += [
            f"## Regime `{regime}`",
            "",
            f"Budget (identical for every method): {json.dumps(budgets.get(regime))}",
            "",
            "| dataset | method | seeds | acc | chance | ECE | conf − acc | NLL | Brier | AURC | mean MI | "
            "AUROC wrong: conf | entropy | MI | T | s/step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (rg, ds, method), rs in sorted(groups.items()):
            if rg != regime:
                continue
            t = (
                f"{np.mean([r['temperature'] for r in rs]):.2f}"
                if all("temperature" in r for r in rs)
                else "–"
            )
            table.append(
                f"| {ds} | {method} | {len(rs)} | {mean_std([r['acc'] for r in rs])} | {rs[0]['chance']:.2f} | "
                f"{mean_std([r['ece'] for r in rs])} | {gap(rs)} | {mean_std([r['nll'] for r in rs])} | "
                f"{mean_std([r['brier'] for r in rs])} | {mean_std([r['aurc'] for r in rs])} | "
                f"{np.mean([r['mean_epistemic'] for r in rs]):.4f} | {au(rs, 'auroc_confidence')} | "
                f"{au(rs, 'auroc_entropy')} | {au(rs, 'auroc_mi')} | {t} | "
                f"{np.mean([r['seconds_per_step'] for r in rs]):.2f} |"
            )
        keep = [
            r
            for r in rows
            if r["regime"] == regime
            and r["method"].startswith("dalorra")
            and "+ts" not in r["method"]
            and r.get("keep_probability")
        ]
        if keep:
            table += [
                "",
                "DALorRA mean keep-probability σ(φ) per module kind: "
                + "; ".join(
                    f"{r['dataset']} {r['method']} seed {r['seed']}: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in r["keep_probability"].items())
                    for r in keep
                ),
            ]
        table += ["", *_targets({k[1:]: v for k, v in groups.items() if k[0] == regime}), ""]
    table += [
        "Mean ± sample standard deviation over the seeds counted in `seeds`. conf − acc: mean top "
        "probability minus accuracy (> 0 over-confident, < 0 under-confident; – where a row predates it). "
        "AUROC wrong: how well −confidence, entropy and MI rank wrong answers above right ones on the test split "
        "(0.5 = no information). T: the temperature of a `+ts` row, fitted by NLL on held-out training items "
        "and applied to every mask's logits before averaging (1 = none). s/step was measured while other "
        "jobs shared the 2 cores: compare methods only within one run (`bench/train_step.py` measures it "
        "interleaved)."
    ]
    table += [
        "",
        "Rows were added by these invocations (resumable; the header's command is the latest):",
        "",
        *[f"- `{c}`" for c in commands],
    ]
    write("calibration", {"budgets": budgets, "commands": commands, "rows": rows}, "\n".join(table))


def _targets(groups: dict) -> list[str]:
    """The issues' targets per dataset, for DALorRA and each variant (dalorra@...) against the plain baselines.

    Every comparison averages only the seeds both sides have (a 2-seed DALorRA mean against a 1-seed baseline would
    compare different draws of the noise); the seeds used are in the cells that are not over the full set. n/a where
    MLE-LoRA is < 10 points above chance (a model at chance is trivially calibrated). Where `+ts` rows exist, the
    product's target too: DALorRA+ts below LoRA+ts in ECE, NLL and AURC."""
    out = [
        "Targets (each comparison averages only the seeds both sides have, shown in brackets where that is not "
        "every seed of the DALorRA row; apply where MLE-LoRA is at least 10 points above chance):",
        "",
        "| dataset | DALorRA | seeds | LoRA − chance | LoRA conf − acc | ECE / LoRA's (≤ 0.4) | ECE below MC dropout "
        "and ensemble | NLL lowest | acc − LoRA's (≥ −0.01) | +ts: ECE, NLL, AURC below LoRA+ts |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ds in sorted({d for d, _ in groups}):
        by_seed = {m: {r["seed"]: r for r in rs} for (d, m), rs in groups.items() if d == ds}
        plain = [m for m in by_seed if "@" not in m and "+ts" not in m]
        if "lora" not in plain:
            continue

        def mean(method: str, key: str, seeds: set, by_seed: dict = by_seed) -> float:
            return float(np.mean([by_seed[method][s].get(key, np.nan) for s in sorted(seeds)]))

        lo_seeds = set(by_seed["lora"])
        above = mean("lora", "acc", lo_seeds) - mean("lora", "chance", lo_seeds)
        gap = mean("lora", "mean_confidence", lo_seeds) - mean("lora", "acc", lo_seeds)
        names = sorted(
            m
            for m in by_seed
            if (m == "dalorra" or m.startswith("dalorra@") and "@top" not in m) and "+ts" not in m
        )
        for name in names:
            own = set(by_seed[name])

            def shared(*others: str, own: set = own, by_seed: dict = by_seed) -> tuple[set, str]:
                s = own.intersection(*(set(by_seed[o]) for o in others))
                return s, ("" if s == own else f" [{','.join(map(str, sorted(s)))}]")

            s_lo, tag_lo = shared("lora")
            cells = [f"{mean(name, 'ece', s_lo) / mean('lora', 'ece', s_lo):.2f}{tag_lo}" if s_lo else "–"]
            others = [m for m in ("mcdropout", "ensemble") if m in by_seed]
            s_o, tag_o = shared(*others)
            cells.append(
                "–"
                if not others or not s_o
                else ("yes" if all(mean(name, "ece", s_o) < mean(m, "ece", s_o) for m in others) else "no")
                + tag_o
            )
            s_all, tag_all = shared(*plain)
            cells.append(
                "–"
                if not s_all
                else (
                    "yes" if all(mean(name, "nll", s_all) <= mean(m, "nll", s_all) for m in plain) else "no"
                )
                + tag_all
            )
            cells.append(
                f"{mean(name, 'acc', s_lo) - mean('lora', 'acc', s_lo):+.3f}{tag_lo}" if s_lo else "–"
            )
            ts = "–"
            if name + "+ts" in by_seed and "lora+ts" in by_seed:
                s_ts, tag_ts = shared(name + "+ts", "lora+ts")
                if s_ts:
                    ts = (
                        ", ".join(
                            "yes" if mean(name + "+ts", k, s_ts) < mean("lora+ts", k, s_ts) else "no"
                            for k in ("ece", "nll", "aurc")
                        )
                        + tag_ts
                    )
            cells.append(ts)
            if above < 0.10:
                cells = [c + " (n/a)" for c in cells]
            out.append(
                f"| {ds} | {name} | {','.join(map(str, sorted(own)))} | {above:+.3f} | "
                f"{'–' if np.isnan(gap) else f'{gap:+.3f}'} | " + " | ".join(cells) + " |"
            )
    return out


if __name__ == "__main__":
    main()
