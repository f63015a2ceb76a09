"""Choose the default adapter on a validation split, then report it on test items no choice looked at.

    python -m bench.default_adapter --candidates DIR [DIR ...] [--select-on arc_easy/validation]
        [--criterion nll] [--label chosen] [--test-skip 150] [--test-limit 200] [--ood mmlu_college_physics/test]
        [--cached-logits shift-test-all]
    python -m bench.default_adapter [--adapter adapters/default/arc-easy-dalorra] [--label after] ...

Honest selection: with --candidates, every candidate is scored on the selection split (ARC-Easy validation by
default: none of them trains or calibrates on it) and the best by --criterion (NLL by default: the proper score the
product's probabilities are for; acc, ece, aurc also possible) is chosen there, before any test item is read. Only
then are the candidates reported on ARC-Easy test items [--test-skip, --test-skip + --test-limit): the first 150
test items informed earlier choices of the default (bench/results/default_adapter.md rows before this change), so by
default they are skipped and never reported as held out. The report keeps the selection table (split, items,
criterion, each candidate's metrics there, the choice).

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

from adapters.adapter_io import load_adapter, read_record
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
    ap.add_argument("--candidates", nargs="+", help="adapter directories to choose between on --select-on")
    ap.add_argument("--select-on", default="arc_easy/validation", help="the split the choice is made on")
    ap.add_argument("--select-limit", type=int, default=None, help="items of --select-on (default: all)")
    ap.add_argument("--criterion", choices=sorted(CRITERIA), default="nll")
    ap.add_argument(
        "--cached-logits",
        metavar="NAME",
        help="reuse a candidate's cached logits of the selection split where bench.ood.CachedScorer left them "
        "(<candidate>.<NAME>_logits.npy, S masks with seed 0: e.g. shift-test-all, bench.shift's scores of all of "
        "ARC-Easy validation); candidates without the file are scored",
    )
    ap.add_argument("--test", default="arc_easy/test")
    ap.add_argument(
        "--test-skip",
        type=int,
        default=150,
        help="leading test items to leave out (the first 150 informed earlier choices of the default)",
    )
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
    test = load_jsonl(a.test, limit=a.test_skip + a.test_limit)[a.test_skip :]
    ood = load_jsonl(a.ood, limit=a.ood_limit)
    if not test:
        raise SystemExit(f"{a.test} has no items after the first {a.test_skip}")
    selection = None
    adapter = a.adapter
    if a.candidates:
        selection = select(a.candidates, a.select_on, a.select_limit, a.criterion, a.samples, a.cached_logits)
        adapter = selection["chosen"]
        print(json.dumps({"selection": selection}), flush=True)
    reports[a.label] = {
        **report_adapter(adapter, test, ood, a.samples),
        "test_items": f"{a.test}[{a.test_skip}:{a.test_skip + len(test)}]",
        "ood": a.ood,
        "selection": selection,
        "command": command(),
    }
    print(json.dumps({k: v for k, v in reports[a.label].items() if k not in ("training", "keep_histogram")}))
    _write(reports)


CRITERIA = {"nll": -1, "ece": -1, "aurc": -1, "acc": 1}  # +1: higher is better


def served_logits(model, items, samples: int) -> np.ndarray:
    """(S, B, K) logits as the server serves them: S masks with seed 0, divided by the stored temperature."""
    return predict_logits(model, items, samples, seed=0, progress=False) / float(
        model.record.get("temperature", 1.0)
    )


def select(
    candidates: list[str],
    split: str,
    limit: int | None,
    criterion: str,
    samples: int,
    cached: str | None = None,
) -> dict:
    """Score every candidate on the selection split and choose the best by `criterion` (ties: the first given).
    `cached`: reuse a candidate's bench.ood.CachedScorer logits of these items under that name, when present
    with S = `samples` masks and one row per item (the same draws the server serves: seed 0)."""
    items = load_jsonl(split, limit=limit)
    labels = np.array([it.label for it in items])
    scores, reused = {}, []
    for c in candidates:
        path = Path(f"{c}.{cached}_logits.npy") if cached else None
        lg = np.load(path) if path is not None and path.is_file() else None
        if lg is not None and lg.shape[:2] in ((samples, len(items)), (1, len(items))):
            lg = lg / float(read_record(c).get("temperature", 1.0))  # no model needed: the scores exist
            reused.append(c)
        else:
            base, tok = load_base(None)
            lg = served_logits(load_adapter(c, base, tok), items, samples)
        m = evaluate_logits(lg, labels)
        scores[c] = {k: m[k] for k in ("acc", "ece", "nll", "aurc")}
    sign = CRITERIA[criterion]
    chosen = max(candidates, key=lambda c: sign * scores[c][criterion])
    return {
        "split": split,
        "items": len(items),
        "criterion": criterion,
        "candidates": scores,
        "chosen": chosen,
        "reused_cached_logits": reused,
    }


def report_adapter(path: str, test: list, ood: list, samples: int) -> dict:
    """One adapter on the test and OOD items, scored as the server scores it."""
    base, tok = load_base(None)
    model = load_adapter(path, base, tok)
    rec = model.record
    T = float(rec.get("temperature", 1.0))
    labels = np.array([it.label for it in test])
    lg, lo = served_logits(model, test, samples), served_logits(model, ood, samples)
    m = evaluate_logits(lg, labels)
    s, so = summarize(lg), summarize(lo)
    decision = rec.get("decision") or {}
    return {
        "adapter": Path(path).name,
        "method": rec.get("method"),
        "adapter_config": rec.get("adapter"),
        "temperature": T,
        "n_test": len(test),
        "n_ood": len(ood),
        "samples": samples,
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
            f"**{label}** ({r['adapter']}, `{r['command']}`): test = "
            + (r.get("test_items") or f"first {r['n_test']} of {r['test']}")
            + f", OOD = first {r['n_ood']} of {r.get('ood', 'the OOD set')} (OOD accuracy {r['ood_acc']:.3f}), "
            f"S = {r['samples']}. "
            + _selection(r.get("selection"))
            + "Thresholds: confidence "
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
        "averaging. Rows before the choice-on-validation change were chosen and reported on the same first 150 test "
        "items; rows with a selection were chosen on the validation split and report test items after the first 150. "
        "AUROC wrong: how well each signal ranks wrong answers above right ones (0.5 = none). "
        "Coverage / selective error: the adapter's own fitted thresholds applied to the test items.",
    ]
    write("default_adapter", {"reports": reports}, "\n".join(lines))


def _selection(sel: dict | None) -> str:
    if not sel:
        return "Not chosen on a validation split. "
    cells = "; ".join(
        f"{Path(c).name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items())
        for c, m in sel["candidates"].items()
    )
    return (
        f"Chosen by {sel['criterion']} on {sel['items']} items of {sel['split']} before any test item was read, "
        f"from {cells}"
        + (
            f" ({', '.join(Path(c).name for c in sel['reused_cached_logits'])}: bench.shift's cached logits of the "
            "same items and draws)"
            if sel.get("reused_cached_logits")
            else ""
        )
        + ". "
    )


def _thr(t: dict | None) -> str:
    if not t:
        return "none"
    return f"{t['threshold']:.4f} (valid)" if t.get("valid") else "no valid threshold at the target"


if __name__ == "__main__":
    main()
