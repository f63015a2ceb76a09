"""Out-of-distribution benchmark: does the epistemic score tell questions from another domain or task apart?

    python -m bench.ood [--dataset arc_easy] [--methods lora dalorra mcdropout ensemble] [--seeds 0]
        [--ood mmlu_college_chemistry/test mmlu_college_physics/test winogrande/dev] [--ood-limit 100]

The paper's protocol trains on OpenBookQA and tests on ARC and MMLU; here OpenBookQA does not learn at any budget
tried (bench/results/dalorra_sweep.md: LoRA 0.34 at lr 1e-3, chance 0.25), so the adapters are the paper-regime
ARC-Easy adapters of bench/calibration.py (runs/bench-paper/<dataset>/<method>-s<seed>, trained first with
`python -m bench.calibration --regime paper ...`). In-distribution items: the calibration benchmark's test items
(the first 150 of <dataset>'s validation file; their logits are reused from the benchmark run). OOD items: the
first --ood-limit items of each OOD file, scored at S = --samples with seed 0 (logits cached beside the adapter).

Per (method, OOD set) row: accuracy and ECE on the OOD items (raw, and `+ts` with the temperature fitted on held-out
training items as in the benchmark), and the AUROC of normalised MI, normalised entropy and −confidence for telling
the OOD items from the in-distribution ones (normalised by log K, since the OOD sets differ in K). OOD accuracy is
reported beside in-distribution accuracy: an "OOD" set that is simply easier would make every signal look bad.
Writes bench/results/ood.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from adapters.adapter_io import load_adapter
from adapters.basemodel import load_base
from adapters.calibration import auroc, fit_temperature, metrics
from adapters.data import load_jsonl
from adapters.evaluate import predict_logits
from adapters.uncertainty import summarize
from bench.budget import REGIMES, SPLITS, save_logits
from bench.common import RESULTS, command, mean_std, write

OOD = ["mmlu_college_chemistry/test", "mmlu_college_physics/test", "winogrande/dev"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="arc_easy", choices=list(SPLITS))
    ap.add_argument("--regime", default="paper", choices=list(REGIMES))
    ap.add_argument("--methods", nargs="+", default=["lora", "dalorra", "mcdropout", "ensemble"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--ood", nargs="+", default=OOD)
    ap.add_argument("--ood-limit", type=int, default=100)
    ap.add_argument(
        "--eval-limit", type=int, default=150, help="in-distribution test items (as the benchmark)"
    )
    ap.add_argument("--calib-items", type=int, default=100)
    ap.add_argument("--samples", type=int, default=10)
    a = ap.parse_args()
    out_json = RESULTS / "ood.json"
    old = json.loads(out_json.read_text()) if out_json.is_file() else {}
    rows, commands = old.get("rows", []), old.get("commands", [])
    done = {(r["method"], r["train_dataset"], r["ood_dataset"], r["seed"]) for r in rows}
    id_items = load_jsonl(SPLITS[a.dataset][1], limit=a.eval_limit)
    id_labels = np.array([it.label for it in id_items])
    root = REGIMES[a.regime]["root"] / a.dataset
    for seed in a.seeds:
        for method in a.methods:
            out = root / f"{method}-s{seed}"
            if not (out / "dalorra.json").is_file():
                raise SystemExit(
                    f"{out}: no adapter; train it first with bench/calibration.py --regime {a.regime}"
                )
            todo = [o for o in a.ood if (method, a.dataset, o, seed) not in done]
            if not todo:
                continue
            logits_for = CachedScorer(out, a.samples)
            id_logits = logits_for("test", id_items)
            calib = load_jsonl(str(root / f"held-out-s{seed}.jsonl"), limit=a.calib_items)
            T = fit_temperature(logits_for("calib", calib), np.array([it.label for it in calib]))
            for ood in todo:
                items = load_jsonl(ood, limit=a.ood_limit)
                labels = np.array([it.label for it in items])
                o_logits = logits_for("ood-" + ood.replace("/", "-"), items)
                for suffix, t in (("", 1.0), ("+ts", T)):
                    row = {
                        "method": method + suffix,
                        "train_dataset": a.dataset,
                        "ood_dataset": ood,
                        "seed": seed,
                        "regime": a.regime,
                        "temperature": t,
                        **ood_row(id_logits / t, id_labels, o_logits / t, labels),
                        "command": command(),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if command() not in commands:
                    commands.append(command())
                _write(rows, commands, a)
    _write(rows, commands, a)


class CachedScorer:
    """(S, B, K) logits of named item sets for the adapter at `out`, each cached beside it as
    `<out>.<name>_logits.npy` (S = `samples`, mask seed 0), so a re-run scores only what is missing.

    The adapter is loaded onto a fresh base on first need only; `release()` frees it."""

    def __init__(self, out: Path, samples: int) -> None:
        self.out, self.samples, self.model = Path(out), samples, None

    def path(self, name: str) -> Path:
        return Path(str(self.out) + f".{name}_logits.npy")

    def __call__(self, name: str, items: list) -> np.ndarray:
        path = self.path(name)
        if path.is_file():
            cached = np.load(path)
            if cached.shape[1] == len(items):
                return cached
        if self.model is None:
            base, tok = load_base(None)
            self.model = load_adapter(self.out, base, tok)
        lg = predict_logits(self.model, items, self.samples, seed=0, progress=False)
        save_logits(self.out, name, lg)
        return lg

    def release(self) -> None:
        self.model = None


def ood_row(
    id_logits: np.ndarray, id_labels: np.ndarray, ood_logits: np.ndarray, ood_labels: np.ndarray
) -> dict:
    """Calibration on the OOD items and how well each signal separates OOD (positive) from in-distribution items."""
    si, so = summarize(id_logits), summarize(ood_logits)
    m_id, m_ood = metrics(si["probabilities"], id_labels), metrics(so["probabilities"], ood_labels)
    is_ood = np.r_[np.zeros(len(id_labels), bool), np.ones(len(ood_labels), bool)]
    return {
        "id_acc": m_id["acc"],
        "acc": m_ood["acc"],
        "ece": m_ood["ece"],
        "nll": m_ood["nll"],
        "chance": float(np.mean(1.0 / np.isfinite(ood_logits).any(0).sum(-1))),
        "auroc_mi": auroc(np.r_[si["epistemic_norm"], so["epistemic_norm"]], is_ood),
        "auroc_entropy": auroc(np.r_[si["entropy_norm"], so["entropy_norm"]], is_ood),
        "auroc_confidence": auroc(-np.r_[si["confidence"], so["confidence"]], is_ood),
        "mean_mi_id": float(si["epistemic_norm"].mean()),
        "mean_mi_ood": float(so["epistemic_norm"].mean()),
        "n_id": int(len(id_labels)),
        "n_ood": int(len(ood_labels)),
    }


def _write(rows: list[dict], commands: list[str], a: argparse.Namespace) -> None:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["train_dataset"], r["ood_dataset"], r["method"]), []).append(r)
    table = [
        "| train | OOD set | method | seeds | ID acc | OOD acc | chance | OOD ECE | OOD NLL | AUROC MI | "
        "AUROC entropy | AUROC −conf | mean MI/log K ID → OOD |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (tr, ood, method), rs in sorted(groups.items()):
        table.append(
            f"| {tr} | {ood} | {method} | {len(rs)} | {mean_std([r['id_acc'] for r in rs])} | "
            f"{mean_std([r['acc'] for r in rs])} | {rs[0]['chance']:.2f} | {mean_std([r['ece'] for r in rs])} | "
            f"{mean_std([r['nll'] for r in rs])} | {mean_std([r['auroc_mi'] for r in rs])} | "
            f"{mean_std([r['auroc_entropy'] for r in rs])} | {mean_std([r['auroc_confidence'] for r in rs])} | "
            f"{np.mean([r['mean_mi_id'] for r in rs]):.4f} → {np.mean([r['mean_mi_ood'] for r in rs]):.4f} |"
        )
    table += ["", *_targets(rows)]
    table += [
        "",
        "AUROC: telling the OOD items (positive) from the in-distribution test items by normalised MI, "
        "normalised entropy, or −confidence (0.5 = no information; a deterministic method's MI is 0 everywhere, "
        "so 0.5). `+ts`: the same predictions with the method's temperature (fitted by NLL on held-out "
        "training items) applied to every mask's logits. ID: the calibration benchmark's test items. Where OOD "
        "accuracy is at or above in-distribution accuracy the set is not harder for the model, and a low AUROC "
        "is expected.",
        "",
        "Rows were added by these invocations:",
        "",
        *[f"- `{c}`" for c in commands],
    ]
    write("ood", {"rows": rows, "commands": commands}, "\n".join(table))


def _targets(rows: list[dict]) -> list[str]:
    """The issue's OOD target: DALorRA's ECE on the OOD items below LoRA's and the ensemble's, raw and with each
    method's temperature; each comparison averages only the seeds every method in it has."""
    by = {}
    for r in rows:
        by.setdefault((r["train_dataset"], r["ood_dataset"]), {}).setdefault(r["method"], {})[r["seed"]] = r
    out = [
        "Target (DALorRA's OOD ECE below LoRA's and the ensemble's; means over the seeds all three have):",
        "",
        "| train | OOD set | temperature | seeds | DALorRA ECE | LoRA ECE | ensemble ECE | DALorRA lowest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (tr, ood), methods in sorted(by.items()):
        for suffix, label in (("", "none"), ("+ts", "fitted")):
            names = ["dalorra" + suffix, "lora" + suffix, "ensemble" + suffix]
            have = [n for n in names if n in methods]
            if names[0] not in have or len(have) < 2:
                continue
            seeds = set.intersection(*(set(methods[n]) for n in have))
            if not seeds:
                continue
            ece = {n: float(np.mean([methods[n][s]["ece"] for s in seeds])) for n in have}
            cells = [f"{ece[n]:.3f}" if n in ece else "–" for n in names]
            lowest = all(ece[names[0]] < ece[n] for n in have[1:])
            out.append(
                f"| {tr} | {ood} | {label} | {','.join(map(str, sorted(seeds)))} | "
                + " | ".join(cells)
                + f" | "
                f"{'yes' if lowest else 'no'}{'' if len(have) == 3 else ' (no ensemble row)'} |"
            )
    return out


if __name__ == "__main__":
    main()
