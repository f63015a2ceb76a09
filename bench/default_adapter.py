"""Report a default adapter on data none of its choices looked at: ARC-Easy's test split and an OOD set.

    python -m bench.default_adapter [--adapter adapters/default/arc-easy-dalorra] [--label after]
        [--test-limit 200] [--ood mmlu_college_physics/test] [--samples 10]

Scores the adapter exactly as the server does (S masks with seed 0, every mask's logits divided by the adapter's
stored temperature before averaging) and reports accuracy, ECE, NLL, AURC, the AUROC of confidence, entropy and MI
for wrong answers, mean MI on in-distribution vs OOD items (and the AUROC of MI for telling them apart), and the
decision thresholds from the adapter's dalorra.json with the coverage and selective error they give on the test
items. Rows are keyed by --label (e.g. "before" for the adapter a change replaced, "after" for the new one) and
kept in bench/results/default_adapter.{json,md}; `--relabel OLD=NEW ...` renames stored rows and measures nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from adapters.adapter_io import load_adapter
from adapters.basemodel import load_base
from adapters.calibration import auroc
from adapters.data import load_jsonl
from adapters.evaluate import decision_report, evaluate_logits, predict_logits
from adapters.uncertainty import summarize
from bench.budget import wrong_answer_aurocs
from bench.common import RESULTS, command, write

DEFAULT = Path(__file__).resolve().parents[1] / "adapters" / "default" / "arc-easy-dalorra"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=str(DEFAULT))
    ap.add_argument("--label", default="after")
    ap.add_argument("--test", default="arc_easy/test")
    ap.add_argument("--test-limit", type=int, default=200)
    ap.add_argument("--ood", default="mmlu_college_physics/test")
    ap.add_argument("--ood-limit", type=int, default=100)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument(
        "--relabel",
        nargs="+",
        metavar="OLD=NEW",
        help="rename stored reports (e.g. after swapping which adapter ships) and rewrite the table; measures nothing",
    )
    a = ap.parse_args()
    out_json = RESULTS / "default_adapter.json"
    old = json.loads(out_json.read_text()) if out_json.is_file() else {}
    reports = old.get("reports", {})
    if a.relabel:
        names = dict(pair.split("=", 1) for pair in a.relabel)
        missing = sorted(set(names) - set(reports))
        if missing:
            raise SystemExit(f"no stored report named {missing}; stored: {sorted(reports)}")
        _write({names.get(k, k): r for k, r in reports.items()})
        return
    base, tok = load_base(None)
    model = load_adapter(a.adapter, base, tok)
    rec = model.record
    T = float(rec.get("temperature", 1.0))
    test = load_jsonl(a.test, limit=a.test_limit)
    ood = load_jsonl(a.ood, limit=a.ood_limit)
    labels = np.array([it.label for it in test])
    lg = predict_logits(model, test, a.samples, seed=0, desc="test") / T
    lo = predict_logits(model, ood, a.samples, seed=0, desc="ood") / T
    m = evaluate_logits(lg, labels)
    s, so = summarize(lg), summarize(lo)
    decision = rec.get("decision") or {}
    reports[a.label] = {
        "adapter": Path(a.adapter).name,
        "method": rec.get("method"),
        "command": command(),
        "adapter_config": rec.get("adapter"),
        "temperature": T,
        "test": a.test,
        "n_test": len(test),
        "ood": a.ood,
        "n_ood": len(ood),
        "samples": a.samples,
        **{k: m[k] for k in ("acc", "ece", "nll", "brier", "aurc", "mean_confidence", "mean_entropy")},
        **{k.replace("auroc_", "auroc_wrong_"): v for k, v in wrong_answer_aurocs(lg, labels).items()},
        "mean_mi_norm_test": float(s["epistemic_norm"].mean()),
        "mean_mi_norm_ood": float(so["epistemic_norm"].mean()),
        "auroc_ood_mi": auroc(
            np.r_[s["epistemic_norm"], so["epistemic_norm"]],
            np.r_[np.zeros(len(test), bool), np.ones(len(ood), bool)],
        ),
        "ood_acc": float((so["answer_index"] == np.array([it.label for it in ood])).mean()),
        "decision": decision,
        "decision_on_test": decision_report(s, labels, decision) if decision else None,
        "keep_probability": rec.get("keep_probability"),
        "keep_histogram": rec.get("keep_histogram"),
        "training": {k: v for k, v in (rec.get("training") or {}).items() if k != "history"},
        "temperature_fit": rec.get("temperature_fit"),
    }
    print(json.dumps({k: v for k, v in reports[a.label].items() if k not in ("training", "keep_histogram")}))
    _write(reports)


def _write(reports: dict) -> None:
    lines = [
        "| adapter | method | T | test acc | ECE | NLL | AURC | AUROC wrong: conf | entropy | MI | "
        "mean MI/log K test → OOD | AUROC OOD by MI | coverage | selective error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in reports.items():
        d = r.get("decision_on_test") or {}
        se = d.get("selective_error")
        lines.append(
            f"| {label}: {r['adapter']} | {r['method']} | {r['temperature']:.2f} | {r['acc']:.3f} | "
            f"{r['ece']:.3f} | {r['nll']:.3f} | {r['aurc']:.3f} | {r['auroc_wrong_confidence']:.3f} | "
            f"{r['auroc_wrong_entropy']:.3f} | {r['auroc_wrong_mi']:.3f} | {r['mean_mi_norm_test']:.5f} → "
            f"{r['mean_mi_norm_ood']:.5f} | {r['auroc_ood_mi']:.3f} | {d.get('coverage', 1.0):.3f} | "
            f"{'–' if se is None else f'{se:.3f}'} |"
        )
    for label, r in reports.items():
        dec = r.get("decision") or {}
        lines += [
            "",
            f"**{label}** ({r['adapter']}, `{r['command']}`): test = first {r['n_test']} of {r['test']}, "
            f"OOD = first {r['n_ood']} of {r['ood']} (OOD accuracy {r['ood_acc']:.3f}), S = {r['samples']}. "
            "Thresholds: confidence "
            + _thr(dec.get("confidence"))
            + "; epistemic (MI / log K) "
            + _thr(dec.get("epistemic"))
            + ". Keep-probabilities: "
            + json.dumps(r.get("keep_probability"))
            + (
                f". Training: {r['training'].get('steps')} steps on {r['training'].get('train_items')} items, "
                f"{r['training'].get('seconds_per_step')} s/step"
                if r.get("training")
                else ""
            ),
        ]
    lines += [
        "",
        "Scored as the server scores: every mask's logits divided by the adapter's temperature T before "
        "averaging. AUROC wrong: how well each signal ranks wrong answers above right ones (0.5 = none). "
        "Coverage / selective error: the adapter's own fitted thresholds applied to the test items.",
    ]
    write("default_adapter", {"reports": reports}, "\n".join(lines))


def _thr(t: dict | None) -> str:
    if not t:
        return "none"
    return f"{t['threshold']:.4f} (valid)" if t.get("valid") else "no valid threshold at the target"


if __name__ == "__main__":
    main()
