"""The README's one summary table, computed from bench/results/*.json (never typed by hand).

    python -m bench.summary            print the table
    python -m bench.summary --write    replace the block between the README's summary markers

Each row links the result file that holds the run, its seeds and its exact command.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from bench.common import RESULTS

README = RESULTS.parent.parent / "README.md"
START, END = "<!-- summary:start (python -m bench.summary --write) -->", "<!-- summary:end -->"


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def calibration_rows() -> list[str]:
    d = _load("calibration")
    if not d:
        return []
    out = []
    for regime, ds in (("paper", "arc_easy"), ("paper", "arc_challenge")):
        rows = [r for r in d["rows"] if r.get("regime") == regime and r["dataset"] == ds]
        core = ("lora", "lora+ts", "dalorra", "dalorra+ts")
        by = {m: [r for r in rows if r["method"] == m] for m in (*core, "mcdropout+ts", "ensemble+ts")}
        if not all(by[m] for m in core):
            continue
        seeds = sorted({r["seed"] for r in by["dalorra"]} & {r["seed"] for r in by["lora"]})
        # a baseline is shown only where it has every seed the comparison uses
        by = {
            m: [r for r in rs if r["seed"] in seeds]
            for m, rs in by.items()
            if m in core or set(seeds) <= {r["seed"] for r in rs}
        }
        cell = "; ".join(
            f"{m} {_mean(rs, 'acc'):.3f} / {_mean(rs, 'ece'):.3f} / {_mean(rs, 'nll'):.3f} / "
            f"{_mean(rs, 'aurc'):.3f}"
            for m, rs in by.items()
        )
        gap = _mean(by["lora"], "mean_confidence") - _mean(by["lora"], "acc")
        out.append(
            f"| Calibration, paper regime, {ds} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}; LoRA "
            f"conf − acc {gap:+.3f}) | acc / ECE / NLL / AURC: {cell}. DALorRA ECE "
            f"{_mean(by['dalorra'], 'ece') / _mean(by['lora'], 'ece'):.2f}× LoRA's (paper: ≤ 0.4×) | "
            "[calibration.md](bench/results/calibration.md) |"
        )
    short = [
        r
        for r in d["rows"]
        if r.get("regime", "short") == "short" and r["dataset"] in ("arc_easy", "arc_challenge")
    ]
    cells = []
    for ds in ("arc_easy", "arc_challenge"):
        lo = [r for r in short if r["dataset"] == ds and r["method"] == "lora"]
        da = [r for r in short if r["dataset"] == ds and r["method"] == "dalorra"]
        if lo and da:
            cells.append(f"{ds} {_mean(da, 'ece') / _mean(lo, 'ece'):.2f}×")
    if cells:
        out.append(
            "| Calibration, short regime (under one epoch; LoRA hardly over-confident) | DALorRA ECE / LoRA's: "
            + ", ".join(cells)
            + " | [calibration.md](bench/results/calibration.md) |"
        )
    return out


def ood_rows() -> list[str]:
    d = _load("ood")
    if not d:
        return []
    cells = []
    for ood in sorted({r["ood_dataset"] for r in d["rows"]}):
        by = {
            m: [r for r in d["rows"] if r["ood_dataset"] == ood and r["method"] == m]
            for m in ("dalorra", "ensemble")
        }
        if not by["dalorra"]:
            continue
        ens = f" (ensemble {_mean(by['ensemble'], 'auroc_mi'):.2f})" if by["ensemble"] else ""
        cells.append(
            f"{ood.split('/')[0]}: MI {_mean(by['dalorra'], 'auroc_mi'):.2f}{ens}, entropy "
            f"{_mean(by['dalorra'], 'auroc_entropy'):.2f}"
        )
    return (
        [
            "| OOD detection, DALorRA trained on ARC-Easy (AUROC vs in-distribution, seed mean) | "
            f"{'; '.join(cells)} | "
            "[ood.md](bench/results/ood.md) |"
        ]
        if cells
        else []
    )


def default_rows() -> list[str]:
    d = _load("default_adapter")
    if not d or "reports" not in d:
        return []
    rep = d["reports"]
    cells = [
        f"{k}: acc {r['acc']:.3f}, ECE {r['ece']:.3f}, NLL {r['nll']:.3f}, mean MI/log K {r['mean_mi_norm_test']:.4f}"
        f" (OOD {r['mean_mi_norm_ood']:.4f}), wrong-answer AUROC of MI {r['auroc_wrong_mi']:.2f}"
        for k, r in rep.items()
        if "withdrawn" not in k  # the story of withdrawn adapters stays in default_adapter.md
    ]
    return [
        f"| Default adapter on ARC-Easy test | {'; '.join(cells)} | "
        "[default_adapter.md](bench/results/default_adapter.md) |"
    ]


def sweep_rows() -> list[str]:
    d = _load("dalorra_sweep")
    if not d:
        return []
    key = {
        (r["variant"], r["seed"]): r for r in d["rows"] if r.get("train_items") == 200 and r.get("lr") == 1e-3
    }
    lo, base = key.get(("lora", 0)), key.get(("base", 0))
    # every lever run at seed 0, in the order it was run (the sweep appends rows)
    levers = [v for v, seed in key if seed == 0 and v not in ("lora", "base")]
    if not (lo and base and levers):
        return []
    cells = [
        f"module (paper) acc {base['acc']:.3f}, ECE {base['ece'] / lo['ece']:.2f}×, MI {base['mean_epistemic']:.4f}"
    ]
    cells += [
        f"{v} acc {key[(v, 0)]['acc']:.3f}, ECE {key[(v, 0)]['ece'] / lo['ece']:.2f}×, MI "
        f"{key[(v, 0)]['mean_epistemic']:.4f}"
        for v in levers
    ]
    return [
        f"| Levers (held-out train split, seed 0; ECE as a multiple of LoRA's, LoRA acc {lo['acc']:.3f}) | "
        f"{'; '.join(cells)} | [dalorra_sweep.md](bench/results/dalorra_sweep.md) |"
    ]


def serving_rows() -> list[str]:
    out = []
    d = _load("serve_efficiency")
    if d:
        r = d["ratios"]
        out.append(
            f"| Serving at S = 10 (HF backend, CPU) | throughput {r['s10_vs_naive_throughput']:.1f}× a naive PEFT "
            f"loop; an answer costs {r['s10_vs_deterministic_cost']:.1f}× a deterministic one, "
            f"{r['adaptive_vs_deterministic_cost']:.1f}× with adaptive sampling | "
            "[serve_efficiency.md](bench/results/serve_efficiency.md) |"
        )
    d = _load("generate")
    if d:
        s, a = d["speed"], d["auroc_wrong"]
        out.append(
            f"| Generation (OpenAI API), 32-token answer | {s['S=0']['p50_cpu_s']:.1f} CPU-s, "
            f"{s['S=10']['p50_cpu_s']:.1f} with the S = 10 uncertainty pass; wrong-answer AUROC of mean MI "
            f"{a['epistemic_mean']['all']:.2f}, of −log-likelihood {a['-loglik_mean']['all']:.2f} | "
            "[generate.md](bench/results/generate.md) |"
        )
    d = _load("reliability")
    if d and not d.get("before"):
        p, o, sb, pr = d["poison"], d["overload"], d.get("slow_body"), d.get("probes") or []
        fz = d.get("fuzz", {}).get("routes", {})
        slow = (
            f"{sb['cut']}/{sb['connections']} dripping bodies cut after ≤ {sb['seconds_to_cut']['max']} s; "
            if sb
            else ""
        )
        out.append(
            f"| Reliability | overload soak: {d['soak']['answered_200']} answered, {d['soak']['refused_429']} refused "
            f"with 429, {d['soak']['other']} other; {sum(x['ok'] for x in pr)}/{len(pr)} defect probes refused "
            f"cleanly; {slow}good requests beside a poisoned one {p['good_answered_200']}/{p['good_requests']}; "
            f"burst: {o['answered_200']}×200, {o['refused_429']}×429, {o['timed_out_504']}×504; fuzz "
            f"{sum(v['status_5xx'] for v in fz.values())} responses ≥ 500 | "
            "[reliability.md](bench/results/reliability.md) |"
        )
    elif d and "before" in d:
        b, p, o = d["before"], d["poison"], d["overload"]
        out.append(
            f"| Safety probes, before → after | good requests beside a poisoned one: "
            f"{b['poison']['good_answered_200']}/{b['poison']['good_requests']} → "
            f"{p['good_answered_200']}/{p['good_requests']}; overload burst: "
            f"{b['overload']['timed_out_504']}×504 → {o['refused_429']}×429, {o['timed_out_504']}×504 | "
            "[reliability.md](bench/results/reliability.md) |"
        )
    d = _load("install")
    if d:
        h = d["help"]
        out.append(
            f"| Install | CPU venv {d['cpu']['bytes'] / 1e9:.2f} GB; client-only venv "
            f"{d['client']['bytes'] / 1e6:.0f} MB; `dalorra predict --help` {h['before: predict --help']['min_s']:.1f} s "
            f"→ {h['after: predict --help']['min_s']:.2f} s | [install.md](bench/results/install.md) |"
        )
    return out


def _targets_line(d: dict, names: list[str] | None = None) -> str:
    """'name value (goal, met/missed)' for the targets asked for (all when None)."""
    t = d.get("targets") or {}
    parts = []
    for k in names or list(t):
        if k not in t or t[k].get("value") is None:
            continue
        v = t[k]["value"]
        shown = f"{v:.3g}" if isinstance(v, float) else str(v)
        parts.append(f"{k} {shown} ({t[k]['goal']}, {'met' if t[k]['met'] else 'missed'})")
    return "; ".join(parts)


def platform_rows() -> list[str]:
    """This turn's serving platform: many adapters on one base, bf16, the scheduler; shift; fuzzing."""
    out = []
    d = _load("multi_adapter")
    if d:
        out.append(
            f"| One base, many adapters; bf16; one scheduler (HF backend, CPU) | {_targets_line(d)} | "
            "[multi_adapter.md](bench/results/multi_adapter.md) |"
        )
    d = _load("shift")
    if d and d.get("targets"):
        names = [k for k in d["targets"] if k.endswith("_dalorra") or k.startswith("live_")]
        out.append(
            f"| Abstention under shift (DALorRA's full policy; all methods in the file) | {_targets_line(d, names)} | "
            "[shift.md](bench/results/shift.md) |"
        )
    d = _load("fuzz")
    if d and "fuzz" in d:
        f = d["fuzz"]
        cases = sum(v["cases"] for v in f.values())
        bad = sum(v["status_5xx"] for v in f.values())
        inv = sum(v["invalid_json"] for v in f.values())
        out.append(
            f"| Fuzzing every route (schema-valid, hostile values) | {cases} requests over {len(f)} routes: "
            f"{bad} responses ≥ 500, {inv} invalid JSON bodies or SSE events | [fuzz.md](bench/results/fuzz.md) |"
        )
    return out


def table() -> str:
    rows = [
        *calibration_rows(),
        *sweep_rows(),
        *ood_rows(),
        *default_rows(),
        *serving_rows(),
        *platform_rows(),
    ]
    return "\n".join(["| what | measured | details |", "|---|---|---|", *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    t = table()
    if not a.write:
        print(t)
        return
    text = README.read_text()
    i, j = text.index(START), text.index(END)
    tmp = README.with_name(".README.md.tmp")
    tmp.write_text(text[: i + len(START)] + "\n" + t + "\n" + text[j:])
    os.replace(tmp, README)


if __name__ == "__main__":
    main()
